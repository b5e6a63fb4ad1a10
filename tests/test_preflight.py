"""Preflight (``trainer/preflight.py``): what the recipe, the model, the data and the optimizer
get wrong is said in the launching process, one line a problem, exit 2, before any rank
spawns; and token files that state their dtype (``trainer/data.py``, ``dtensor-parallel tokens``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import dtensor_parallel.cli as cli
from dtensor_parallel.cli import main as cli_main
from dtensor_parallel.trainer import data as data_mod
from dtensor_parallel.trainer.data import TokenFileDataset, statement_path, write_token_file
from dtensor_parallel.trainer.preflight import check_model_args

REPO = Path(__file__).resolve().parents[1]
DEBUG_RECIPE = REPO / "recipes" / "debug.toml"  # 4 ranks: TP2 (+SP) x FSDP2, 8 heads / 4 kv heads, vocab 2048


@pytest.fixture
def no_launch(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the preflight let a bad recipe through to the launch")

    monkeypatch.setattr(cli, "relaunch", refuse)


def _errors(capsys, *flags: str) -> list[str]:
    """The error lines of a 4-rank launch that must not happen."""
    rc = cli_main(["train", str(DEBUG_RECIPE), "--nproc-per-node", "4", "--lr-warmup-iters", "0", *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert err and all(line.startswith("dtensor-parallel train: error: ") for line in err), err
    return err


CASES = {  # what failed only after the spawn (issue 20), and the model's shapes
    "tp vs heads": (["--tensor-model-parallel-size", "4", "--num-attention-heads", "6", "--hidden-size", "192"],
                    [r"tp=4 does not divide the 6 attention heads"]),
    "SP sequence": (["--seq-length", "127"], [r"sequence length 127 is not divisible by tp=2"]),
    "CP sequence": (["--context-parallel-size", "2", "--seq-length", "126"], [r"126 is not divisible by 2 x cp = 4"]),
    "vocab vs tp": (["--vocab-size", "2051"], [r"tp=2 does not divide .*2051 \(the vocab size\)"]),
    "pp split": (["--pipeline-model-parallel-size", "2", "--num-layers", "3"],
                 [r"3 layers do not split evenly over 2 stages"]),
    "adam": (["--adam-beta1", "1.5", "--adam-eps", "0"],
             [r"beta1=1.5 \(--adam-beta1\) must be in \[0, 1\)", r"eps=0.0 \(--adam-eps\) must be"]),
    "dim vs heads": (["--num-attention-heads", "6"], [r"dim=256 \(--hidden-size\) is not divisible by n_heads=6"]),
    "odd head dim": (["--num-attention-heads", "8", "--hidden-size", "200"], [r"head dim .* = 25 is odd"]),
    "kv groups": (["--num-attention-heads", "8", "--group-query-attention", "--num-query-groups", "3"],
                  [r"n_kv_heads=3 \(--num-query-groups\) does not divide n_heads=8"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe_stops_before_the_spawn_one_line_each(case, capsys, no_launch):
    flags, patterns = CASES[case]
    err = _errors(capsys, *flags)
    assert len(err) == len(patterns), err
    for line, pattern in zip(err, patterns):
        assert re.search(pattern, line), (pattern, line)


def test_token_file_problems_stop_before_the_spawn(tmp_path, capsys, no_launch):
    chain = torch.arange(4000) % 2048
    stated = write_token_file(tmp_path / "ok.bin", chain, "uint16")
    assert json.loads(statement_path(stated).read_text())["dtype"] == "uint16"
    raw32 = tmp_path / "raw32.bin"  # a uint32 file written by another tool, no statement
    raw32.write_bytes(chain.to(torch.int32).numpy().tobytes())
    small = write_token_file(tmp_path / "small.bin", chain[:1000])
    bad = chain.clone()
    bad[3001] = 5000
    big_id = write_token_file(tmp_path / "big_id.bin", bad)
    cut = write_token_file(tmp_path / "cut.bin", chain)
    cut.write_bytes(cut.read_bytes()[:-64])  # changed after its statement
    cases = {
        tmp_path / "missing.bin": r"does not exist",
        raw32: r"does not state its dtype .* valid token ids both as uint16 and as uint32.*dtensor-parallel tokens",
        small: r"too small: 1000 tokens make 7 windows",
        big_id: r"token 3001 of the file is id 5000 >= vocab_size 2048",
        cut: r"has 7936 bytes but .*cut.bin.json states 4000 uint16 tokens",
    }
    for path, pattern in cases.items():
        err = _errors(capsys, "--data-path", str(path))
        assert len(err) == 1 and re.search(pattern, err[0]), (path, err)
    err = _errors(capsys, "--data-path", str(stated), "--data-dtype", "uint32")
    assert "--data-dtype) but" in err[0] and "states 'uint16'" in err[0], err
    # several problems: one line each
    err = _errors(capsys, "--data-path", str(raw32), "--adam-beta2", "1.0", "--seq-length", "127")
    assert len(err) == 3, err


def test_tokens_command_states_a_file(tmp_path, capsys):
    ids = torch.arange(3000) % 300
    raw = tmp_path / "raw.bin"
    raw.write_bytes(ids.to(torch.int32).numpy().tobytes())
    assert cli_main(["tokens", str(raw)]) == 1  # unstated: says what it could be
    assert "uint16: valid ids" in capsys.readouterr().out
    assert cli_main(["tokens", str(raw), "--dtype", "uint32", "--vocab-size", "200"]) == 2
    assert "token 200 is id 200 >= vocab_size 200" in capsys.readouterr().err
    assert cli_main(["tokens", str(raw), "--dtype", "uint32", "--vocab-size", "300"]) == 0
    meta = json.loads(statement_path(raw).read_text())
    assert meta == {"format": "dtensor-parallel tokens", "version": 1, "dtype": "uint32", "n_tokens": 3000,
                    "max_id": 299}
    ds = TokenFileDataset(raw, dtype=None, seq_len=16, vocab_size=300, global_batch_size=4)
    assert ds.dtype == "uint32" and torch.equal(ds.batch(0)[0][0], (ds.batch(0)[0][0][0] + torch.arange(16)) % 300)


def test_unstated_files_read_when_only_one_dtype_fits_and_batches_name_bad_positions(tmp_path, monkeypatch):
    ids = torch.randint(0, 2048, (16 * 64 + 1,), generator=torch.Generator().manual_seed(0))
    ids[900] = 4000  # beyond the up-front scan below: found by the batch that reads it
    path = tmp_path / "t.bin"
    path.write_bytes(ids.to(torch.int16).numpy().tobytes())  # odd token count: only uint16 fits its size
    monkeypatch.setattr(data_mod, "VOCAB_SCAN_TOKENS", 512)
    ds = TokenFileDataset(path, dtype=None, seq_len=16, vocab_size=4096, global_batch_size=4)
    assert ds.dtype == "uint16"
    ds = TokenFileDataset(path, dtype=None, seq_len=16, vocab_size=2048, global_batch_size=4)
    with pytest.raises(ValueError, match=r"token 900 of the file is id 4000 >= vocab_size 2048"):
        for step in range(ds.steps_per_epoch):
            ds.batch(step)


def test_model_shapes_of_every_flavour_pass():
    from dtensor_parallel.models.llama import LLAMA3_FLAVOURS, MOE_FLAVOURS

    for args in (*LLAMA3_FLAVOURS.values(), *MOE_FLAVOURS.values()):
        check_model_args(args)


def test_plan_command_runs_the_same_checks(tmp_path):
    from dtensor_parallel.planning.dry_run import run_plan

    code, report = run_plan(str(DEBUG_RECIPE), ["--seq-length", "127", "--adam-eps", "-1"], gpu_memory=None,
                            world_size=None, out=str(tmp_path / "p.png"))
    assert code == 2 and "sequence length 127" in report and "eps=-1.0" in report, report
