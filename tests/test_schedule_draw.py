"""`dtensor-parallel schedule`: action orders, simulated bubbles against theory, PNG, CLI."""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from pathlib import Path

import pytest

from dtensor_parallel.cli import main
from dtensor_parallel.pipeline.schedules import theoretical_bubble
from dtensor_parallel.planning.draw import (ascii_timeline, action_orders, bubble_fraction, draw_png,
                                            n_stages_of, simulate, stage_times)

CASES = [("gpipe", 1), ("gpipe", 2), ("1f1b", 1), ("interleaved_1f1b", 2), ("interleaved_1f1b", 3),
         ("zero_bubble", 1), ("zero_bubble", 2), ("zbv", 2)]


def run(name: str, pp: int, virtual: int, m: int):
    n_stages = n_stages_of(name, pp, virtual)
    orders = action_orders(name, pp, virtual, m)
    return orders, simulate(orders, pp, n_stages, stage_times(n_stages // pp))


@pytest.mark.parametrize("name,virtual", CASES)
def test_orders_hold_each_action_once(name: str, virtual: int) -> None:
    pp, m = 4, 8
    n_stages = n_stages_of(name, pp, virtual)
    orders = action_orders(name, pp, virtual, m)
    counts = Counter(a for r in range(pp) for a in orders[r])
    assert max(counts.values()) == 1
    assert {(s, mb) for k, s, mb in counts if k == "F"} == {(s, mb) for s in range(n_stages) for mb in range(m)}
    grads = {(s, mb) for k, s, mb in counts if k in ("B", "BW")}
    assert grads == {(s, mb) for s in range(n_stages) for mb in range(m)}
    split = {(s, mb) for k, s, mb in counts if k == "B"}
    assert split == {(s, mb) for k, s, mb in counts if k == "W"}  # every B has its W
    if name in ("zero_bubble", "zbv"):
        assert split  # the split backward is used
    else:
        assert not split


@pytest.mark.parametrize("name,virtual,m", [("gpipe", 1, 8), ("gpipe", 1, 4), ("1f1b", 1, 8), ("1f1b", 1, 12),
                                            ("gpipe", 2, 8), ("interleaved_1f1b", 2, 8),
                                            ("interleaved_1f1b", 3, 8), ("interleaved_1f1b", 2, 16)])
def test_simulated_bubble_matches_theory(name: str, virtual: int, m: int) -> None:
    pp = 4
    _, tl = run(name, pp, virtual, m)
    bub = bubble_fraction(tl)
    assert bub.bubble_over_compute == pytest.approx(theoretical_bubble(pp, virtual, m), abs=1e-9)
    # same bubble, seen as a share of all GPU time: b / (1 + b)
    b = bub.bubble_over_compute
    assert bub.idle_fraction == pytest.approx(b / (1 + b))


def test_zero_bubble_schedules_beat_1f1b() -> None:
    base = bubble_fraction(run("1f1b", 4, 1, 8)[1]).bubble_over_compute
    for name, virtual in [("zero_bubble", 1), ("zero_bubble", 2), ("zbv", 2)]:
        assert bubble_fraction(run(name, 4, virtual, 8)[1]).bubble_over_compute < base / 2, name


def test_deadlock_is_detected() -> None:
    orders = {0: [("F", 0, 0), ("BW", 0, 0)], 1: [("BW", 1, 0), ("F", 1, 0)]}
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(orders, 2, 2)


def test_ascii_rows() -> None:
    _, tl = run("1f1b", 4, 1, 8)
    lines = ascii_timeline(tl).splitlines()
    assert len(lines) == 4 and len({len(x) for x in lines}) == 1
    assert lines[0].startswith("R0 |F0F1F2F3.") and lines[3].startswith("R3 |......F0X0")


def read_png(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body)
        chunks.append((tag, body))
        pos += 12 + length
    assert [t for t, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    w, h, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour) == (8, 2)
    return w, h, zlib.decompress(chunks[1][1])


def test_png_is_valid(tmp_path: Path) -> None:
    _, tl = run("interleaved_1f1b", 4, 2, 8)
    path = tmp_path / "s.png"
    w, h = draw_png(tl, str(path), "interleaved_1f1b")
    pw, ph, raw = read_png(path)
    assert (pw, ph) == (w, h) and h >= 4 * 28
    assert len(raw) == h * (1 + 3 * w)
    assert all(raw[y * (1 + 3 * w)] == 0 for y in range(h))  # filter byte "none" on every row


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.png"
    assert main(["schedule", "--pp", "4", "--vpp", "2", "--microbatches", "8", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "schedule interleaved_1f1b" in text
    assert "bubble_over_compute = 0.1875" in text and "(p-1)/(v m) = 3/(2*8) = 0.1875" in text
    assert "idle_fraction = " in text and "R3 |" in text
    read_png(out)


def test_cli_default_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["schedule", "--schedule", "zbv", "--pp", "4", "--microbatches", "8"]) == 0
    assert (tmp_path / "schedule_zbv_pp4_v2_m8.png").exists()
    assert "bubble_over_compute = 0.0625" in capsys.readouterr().out


def test_cli_invalid_combination(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "s.png"
    assert main(["schedule", "--schedule", "1f1b", "--vpp", "2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "1f1b" in err and "interleaved_1f1b" in err
    assert not out.exists()
