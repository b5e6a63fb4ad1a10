"""Drawing a pipeline schedule: per-rank action order, a timing simulation, PNG and ASCII.

The order of (F, B, W) actions on each pp rank comes from torch's own schedule classes for
the multi-stage schedules, so the picture is what :mod:`torch.distributed.pipelining` runs;
GPipe (Huang et al. 2019) and 1F1B (PipeDream-Flush, Narayanan et al. 2021) with one stage
a rank are generated here. :func:`simulate` then times them with zero-cost communication.

Kinds: ``F`` forward, ``B`` backward for the input gradient, ``W`` backward for the weight
gradient (the split of Zero Bubble, Qi et al. 2023), ``BW`` a full backward (B + W).
With a stage costing 1/v of a rank's model slice (F = 1/v, B = W = 1/v, BW = 2/v), the
simulated ``bubble_over_compute`` is exactly (p-1)/m for GPipe and 1F1B and (p-1)/(v m)
for interleaved 1F1B (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training
on GPU Clusters"), and much smaller for the zero-bubble schedules.

The PNG is written without matplotlib: rectangles rasterized into an RGB buffer, a 3x5
bitmap font, and a PNG encoded by hand (IHDR, one zlib IDAT, IEND; CRC by ``zlib.crc32``).
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..pipeline.schedules import SCHEDULES, check_schedule, schedule_class, theoretical_bubble
from ..pipeline.split import stages_of_rank

Action = tuple[str, int, int]  # (kind, stage, microbatch), kind in F, B, W, BW
DEFAULT_TIMES: dict[str, float] = {"F": 1.0, "B": 1.0, "W": 1.0, "BW": 2.0}


class Slot(NamedTuple):
    start: float
    end: float
    kind: str
    stage: int
    mb: int


@dataclass(frozen=True)
class Timeline:
    ranks: list[list[Slot]]  # per pp rank, in execution order
    makespan: float
    n_stages: int

    @property
    def pp(self) -> int:
        return len(self.ranks)


@dataclass(frozen=True)
class Bubble:
    idle_fraction: float  # idle time / (pp x makespan): share of GPU time wasted
    bubble_over_compute: float  # (makespan - per-rank compute) / per-rank compute: (p-1)/(v m)


def n_stages_of(name: str, pp: int, virtual: int) -> int:
    return 2 * pp if SCHEDULES[name].style == "v" else pp * virtual


def stage_times(virtual: int) -> dict[str, float]:
    """F, B, W, BW costs of one stage holding 1/v of a rank's layers (per-rank compute fixed)."""
    return {k: t / virtual for k, t in DEFAULT_TIMES.items()}


# ---- action order ------------------------------------------------------------------------
class _StandInStage:
    """Just the attributes torch's schedule constructors read to plan the action order."""

    def __init__(self, index: int, n_stages: int, pp: int) -> None:
        self.stage_index, self.num_stages = index, n_stages
        self.group_rank, self.group_size = 0, pp
        self.is_first, self.is_last = index == 0, index == n_stages - 1
        self.submod = torch.nn.Linear(1, 1)
        self.has_backward = True


def torch_action_orders(name: str, pp: int, virtual: int, n_micro: int) -> dict[int, list[Action]]:
    """Per-rank compute order read from torch's own ``PipelineScheduleMulti.pipeline_order``.

    The schedule class is built with stand-in stages for rank 0 (no process group needed);
    it plans all ranks' orders in its constructor. Reading torch's own ordering, rather than
    re-deriving it, keeps the drawing equal to what the runtime executes. ``None`` (idle)
    and communication actions are skipped; torch's I / W / B become B / W / BW here.
    """
    from torch.distributed.pipelining.schedules import _ComputationType as C

    kinds = {C.FORWARD: "F", C.BACKWARD_INPUT: "B", C.BACKWARD_WEIGHT: "W", C.FULL_BACKWARD: "BW"}
    n_stages = n_stages_of(name, pp, virtual)
    stages = [_StandInStage(s, n_stages, pp) for s in stages_of_rank(0, pp, virtual, SCHEDULES[name].style)]
    sched = schedule_class(name, virtual)(stages, n_micro)
    return {r: [(kinds[a.computation_type], a.stage_index, a.microbatch_index)
                for a in sched.pipeline_order[r] if a is not None and a.computation_type in kinds]
            for r in range(pp)}


def action_orders(name: str, pp: int, virtual: int, n_micro: int) -> dict[int, list[Action]]:
    """Per-rank (kind, stage, microbatch) order. GPipe (Huang et al. 2019) with one stage:
    all F then all BW. 1F1B (PipeDream-Flush, Narayanan et al. 2021): rank r warms up with
    p-1-r forwards, alternates F and BW, then drains the backwards. Others: torch's order."""
    if name == "1f1b" or (name == "gpipe" and virtual == 1):
        orders: dict[int, list[Action]] = {}
        for r in range(pp):
            warm = n_micro if name == "gpipe" else min(pp - 1 - r, n_micro)
            seq: list[Action] = [("F", r, i) for i in range(warm)]
            for i in range(n_micro - warm):
                seq += [("F", r, warm + i), ("BW", r, i)]
            seq += [("BW", r, i) for i in range(n_micro - warm, n_micro)]
            orders[r] = seq
        return orders
    return torch_action_orders(name, pp, virtual, n_micro)


# ---- timing ------------------------------------------------------------------------------
def _deps(kind: str, stage: int, mb: int, n_stages: int) -> list[tuple[str, int, int]]:
    """What must be done first: F(s-1) for F(s); the input grad of s+1 (or F of the last
    stage) and F(s) for B/BW(s); B(s) for W(s). "G" marks an input gradient (B or BW)."""
    if kind == "F":
        return [("F", stage - 1, mb)] if stage > 0 else []
    if kind == "W":
        return [("G", stage, mb)]
    return [("F", stage, mb)] + ([("G", stage + 1, mb)] if stage < n_stages - 1 else [])


def simulate(orders: Mapping[int, list[Action]], pp: int, n_stages: int,
             times: Mapping[str, float] | None = None) -> Timeline:
    """Each rank runs its actions in order; one starts at max(rank free, dependencies done).
    Communication is free. Raises ``RuntimeError`` if no rank can make progress."""
    times = DEFAULT_TIMES if times is None else times
    done: dict[tuple[str, int, int], float] = {}
    free = [0.0] * pp
    pos = [0] * pp
    ranks: list[list[Slot]] = [[] for _ in range(pp)]
    while any(pos[r] < len(orders[r]) for r in range(pp)):
        progressed = False
        for r in range(pp):
            while pos[r] < len(orders[r]):
                kind, s, mb = orders[r][pos[r]]
                ends = [done.get(d) for d in _deps(kind, s, mb, n_stages)]
                if any(e is None for e in ends):
                    break
                start = max([free[r], *ends])  # type: ignore[list-item]
                free[r] = start + times[kind]
                ranks[r].append(Slot(start, free[r], kind, s, mb))
                done[("G" if kind in ("B", "BW") else kind, s, mb)] = free[r]
                pos[r] += 1
                progressed = True
        if not progressed:
            stuck = {r: orders[r][pos[r]] for r in range(pp) if pos[r] < len(orders[r])}
            raise RuntimeError(f"pipeline schedule deadlocks: each rank waits on its next action {stuck}")
    return Timeline(ranks, max(free), n_stages)


def bubble_fraction(timeline: Timeline) -> Bubble:
    """``idle_fraction`` = idle / (pp x makespan); ``bubble_over_compute`` = (makespan -
    compute of the busiest rank) / that compute, the (p-1)/(v m) of Narayanan et al. 2021."""
    compute = [sum(s.end - s.start for s in row) for row in timeline.ranks]
    total = timeline.pp * timeline.makespan
    return Bubble((total - sum(compute)) / total, (timeline.makespan - max(compute)) / max(compute))


# ---- ASCII -------------------------------------------------------------------------------
ASCII_CHAR = {"F": "F", "B": "B", "W": "W", "BW": "X"}


def ascii_timeline(timeline: Timeline) -> str:
    """One line per rank; each action is its letter (X: full backward; lower case: a later
    virtual stage) then the micro-batch, padded with '-' to its length; '.' is idle.
    One cell = the shortest action."""
    slots = [s for row in timeline.ranks for s in row]
    res = min(s.end - s.start for s in slots)
    w = 1 + len(str(max(s.mb for s in slots)))
    width = round(timeline.makespan / res) * w
    lines = []
    for r, row in enumerate(timeline.ranks):
        line = ["."] * width
        for s in row:
            a, b = round(s.start / res) * w, round(s.end / res) * w
            c = ASCII_CHAR[s.kind] if s.stage < timeline.pp else ASCII_CHAR[s.kind].lower()
            line[a:b] = list((c + str(s.mb)).ljust(b - a, "-")[: b - a])
        lines.append(f"R{r:<{len(str(timeline.pp - 1))}} |{''.join(line)}|")
    return "\n".join(lines)


# ---- PNG ---------------------------------------------------------------------------------
_GLYPHS = (  # 3x5 bitmap font, rows top to bottom
    "0111101101101111 1010110010010111 2111001111100111 3111001111001111 4101101111001001 "
    "5111100111001111 6111100111101111 7111001001010010 8111101111101111 9111101111001111 "
    "A010101111101101 B110101110101110 C011100100100011 D110101101101110 E111100110100111 "
    "F111100110100100 G011100101101011 H101101111101101 I111010010010111 J001001001101010 "
    "K101101110101101 L100100100100111 M101111111101101 N110101101101101 O010101101101010 "
    "P110101110100100 Q010101101110011 R110101110101101 S011100010001110 T111010010010010 "
    "U101101101101111 V101101101101010 W101101111111101 X101101010101101 Y101101010010010 "
    "Z111001010100111 .000000000000010 _000000000000111 -000000111000000 =000111000111000 "
    "/001001010100100 (010100100100010 )010001001001010 :000010000010000 ,000000000010100 "
    "%101001010100101 +000010111010000"
)
FONT: dict[str, str] = {g[0]: g[1:] for g in _GLYPHS.split()} | {" ": "0" * 15}
COLOURS: dict[str, tuple[int, int, int]] = {
    "F": (66, 120, 215), "B": (240, 150, 30), "W": (50, 165, 85), "BW": (200, 60, 60)}
LEGEND = {"F": "FORWARD", "B": "BACKWARD INPUT", "W": "BACKWARD WEIGHT", "BW": "FULL BACKWARD"}
IDLE, AXIS, BG, INK = (222, 222, 222), (120, 120, 120), (255, 255, 255), (20, 20, 20)
ROW_H, ROW_GAP, PAD, BOX_PX = 28, 4, 8, 28  # BOX_PX: width of the shortest action


class Canvas:
    """An RGB raster with rectangles and 3x5-font text, saved as PNG."""

    def __init__(self, width: int, height: int) -> None:
        self.w, self.h = width, height
        self.buf = bytearray(bytes(BG) * (width * height))

    def rect(self, x0: int, y0: int, x1: int, y1: int, rgb: tuple[int, int, int]) -> None:
        x0, x1, y0, y1 = max(x0, 0), min(x1, self.w), max(y0, 0), min(y1, self.h)
        if x1 > x0:
            line = bytes(rgb) * (x1 - x0)
            for y in range(y0, y1):
                self.buf[(y * self.w + x0) * 3:(y * self.w + x1) * 3] = line

    def text(self, x: int, y: int, s: str, scale: int = 2, rgb: tuple[int, int, int] = INK) -> None:
        for ch in s.upper():
            bits = FONT.get(ch, FONT[" "])  # unknown characters draw as a space
            for i, bit in enumerate(bits):
                if bit == "1":
                    px, py = x + (i % 3) * scale, y + (i // 3) * scale
                    self.rect(px, py, px + scale, py + scale, rgb)
            x += 4 * scale

    def png(self) -> bytes:
        def chunk(tag: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

        stride = self.w * 3
        raw = b"".join(b"\x00" + bytes(self.buf[y * stride:(y + 1) * stride]) for y in range(self.h))
        ihdr = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9))
                + chunk(b"IEND", b""))


def text_width(s: str, scale: int = 2) -> int:
    return len(s) * 4 * scale - scale


def _shade(rgb: tuple[int, int, int], chunk: int, n_chunks: int) -> tuple[int, int, int]:
    """Later virtual stages paler (as in the interleaved figure of Narayanan et al. 2021)."""
    f = 0.5 * chunk / (n_chunks - 1) if n_chunks > 1 else 0.0
    return tuple(round(c + (255 - c) * f) for c in rgb)  # type: ignore[return-value]


def draw_png(timeline: Timeline, path: str, title: str = "", max_width: int = 4000) -> tuple[int, int]:
    """Write the timeline as a PNG (rows = pp ranks, x = time, grey = idle); returns (w, h)."""
    slots = [s for row in timeline.ranks for s in row]
    n_chunks = timeline.n_stages // timeline.pp
    left = PAD + text_width(f"R{timeline.pp - 1}") + 8
    unit = BOX_PX / min(s.end - s.start for s in slots)  # pixels per time unit
    unit = min(unit, (max_width - left - PAD) / timeline.makespan)
    kinds = [k for k in COLOURS if any(s.kind == k for s in slots)]
    legend = [(k, f"{k} {LEGEND[k]}") for k in kinds] + [("IDLE", "IDLE")]
    note = "PALER = LATER VIRTUAL STAGE" if n_chunks > 1 else ""
    legend_w = sum(18 + text_width(t) + 16 for _, t in legend) + text_width(note)
    plot_w = math.ceil(timeline.makespan * unit)
    width = max(left + plot_w, text_width(title), legend_w) + PAD
    top = PAD + 10 + 10 + 14 + 12  # title, gap, legend swatches, gap
    height = top + timeline.pp * (ROW_H + ROW_GAP) + 16 + PAD
    cv = Canvas(width, height)
    cv.text(PAD, PAD, title)
    x, ly = PAD, PAD + 20
    for k, t in legend:
        cv.rect(x, ly, x + 14, ly + 14, IDLE if k == "IDLE" else COLOURS[k])
        cv.text(x + 18, ly + 2, t)
        x += 18 + text_width(t) + 16
    cv.text(x, ly + 2, note, rgb=AXIS)
    for r, row in enumerate(timeline.ranks):
        y = top + r * (ROW_H + ROW_GAP)
        cv.text(PAD, y + (ROW_H - 10) // 2, f"R{r}")
        cv.rect(left, y, left + plot_w, y + ROW_H, IDLE)
        for s in row:
            x0, x1 = left + round(s.start * unit), left + round(s.end * unit)
            fill = _shade(COLOURS[s.kind], s.stage // timeline.pp, n_chunks)
            cv.rect(x0, y, x1, y + ROW_H, tuple(c * 3 // 5 for c in fill))  # type: ignore[arg-type]
            cv.rect(x0 + 1, y + 1, x1 - 1, y + ROW_H - 1, fill)
            ink = INK if 0.3 * fill[0] + 0.59 * fill[1] + 0.11 * fill[2] > 140 else BG
            label = str(s.mb)
            for scale in (2, 1):
                if text_width(label, scale) + 4 <= x1 - x0:
                    cv.text((x0 + x1 - text_width(label, scale)) // 2, y + (ROW_H - 5 * scale) // 2,
                            label, scale, ink)
                    break
    axis_y = top + timeline.pp * (ROW_H + ROW_GAP)
    step = max(1, math.ceil(24 / unit))  # time units between labelled ticks
    for t in range(math.floor(timeline.makespan) + 1):
        tx = left + round(t * unit)
        cv.rect(tx, axis_y - ROW_GAP, tx + 1, axis_y + (4 if t % step else 6), AXIS)
        if t % step == 0:
            cv.text(tx - text_width(str(t), 1) // 2, axis_y + 8, str(t), 1, AXIS)
    with open(path, "wb") as f:
        f.write(cv.png())
    return width, height


# ---- the command -------------------------------------------------------------------------
def render_schedule(name: str, pp: int, virtual: int, n_micro: int, out: str | None) -> str:
    """Order, simulate and draw one schedule; returns the report printed by the CLI.
    Raises ``ValueError`` for a combination the schedule does not take."""
    if pp < 1 or n_micro < 1:
        raise ValueError(f"need pp >= 1 and micro-batches >= 1, got pp={pp}, microbatches={n_micro}")
    check_schedule(name, pp, virtual, n_micro)
    n_stages = n_stages_of(name, pp, virtual)
    v = n_stages // pp
    times = stage_times(v)
    tl = simulate(action_orders(name, pp, virtual, n_micro), pp, n_stages, times)
    bub = bubble_fraction(tl)
    out = out or f"schedule_{name}_pp{pp}_v{v}_m{n_micro}.png"
    theory = theoretical_bubble(pp, v, n_micro)
    w, h = draw_png(tl, out, f"{name}  pp={pp} v={v} m={n_micro}  bubble {bub.bubble_over_compute:.4f}")
    zb = " (the 1F1B-family figure; zero-bubble schedules aim at about 0, Qi et al. 2023)" \
        if name in ("zero_bubble", "zbv") else ""
    return "\n".join([
        f"schedule {name}: pp={pp}, {v} stage(s) per rank, {n_micro} micro-batches; times per stage "
        f"F={times['F']:g} B={times['B']:g} W={times['W']:g} full backward={times['BW']:g}",
        "legend: F forward, B backward input, W backward weight, X full backward, . idle"
        + ("; lower case: later virtual stage" if v > 1 else ""),
        ascii_timeline(tl),
        f"bubble_over_compute = {bub.bubble_over_compute:.4f}  (theory (p-1)/(v m) = {pp - 1}/({v}*{n_micro}) "
        f"= {theory:.4f}{zb})",
        f"idle_fraction = {bub.idle_fraction:.4f}  (idle / (pp x makespan {tl.makespan:g}))",
        f"wrote {out} ({w}x{h} px)",
    ])
