"""The trainer never applies or saves a non-finite step, resumes with the flags it is given,
and survives what a crash or a full disk leaves behind (issue 20, items 2, 3 and 10).

The runs call ``train`` in-process on a pool of 2 gloo ranks (tests/harness.py): a debug
Llama cut to 2 layers and 32-token sequences, a few steps each."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from pathlib import Path

import pytest
import torch

from .harness import run_distributed

REPO = Path(__file__).resolve().parents[1]


def _config(tmp: str, **over):
    from dtensor_parallel.trainer import config_from_dict

    raw = {"cluster": {"device": "cpu"},
           "model": {"flavour": "debug", "n_layers": 1, "dim": 128, "n_heads": 4, "n_kv_heads": 2,
                     "vocab_size": 1024, "max_seq_len": 32},
           "parallel": {"dp_shard": -1},  # FSDP2 over the 2 ranks
           "training": {"micro_batch_size": 2, "seq_len": 32, "steps": 2, "lr": 3e-3, "warmup_steps": 1},
           "data": {"mock": True}, "logging": {"metrics_path": f"{tmp}/metrics.jsonl"},
           "checkpoint": {"save": f"{tmp}/ckpt", "save_interval": 1}}
    for section, values in over.items():
        raw.setdefault(section, {}).update(values)
    return config_from_dict(raw)


def _train(cfg) -> tuple[list[float] | None, str | None, str]:
    """(losses, error message, rank 0's stdout) of one in-process run."""
    from dtensor_parallel.trainer import train

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            return train(cfg), None, out.getvalue()
        except Exception as e:  # noqa: BLE001 - the test looks at it
            return None, f"{type(e).__name__}: {e}", out.getvalue()


def _all_finite(ckpt_dir: Path) -> bool:
    """Every tensor of a published checkpoint, read whole in this one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = ckpt_dir.parent / f"{ckpt_dir.name}.pt"
    dcp_to_torch_save(ckpt_dir, flat)
    state = torch.load(flat, weights_only=False)
    flat.unlink()
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return bool(tensors) and all(bool(torch.isfinite(v).all()) for v in tensors)


# ---- non-finite steps, then resumes with new flags ---------------------------------------
def _blow_up_then_resume(tmp: str) -> dict:
    import torch.distributed as dist

    from dtensor_parallel.checkpoint.atomic import complete_checkpoints

    def metrics() -> list[dict]:
        return [json.loads(line) for line in Path(f"{tmp}/metrics.jsonl").read_text().splitlines()]

    res: dict = {}
    _train(_config(tmp))  # 1. two sane steps: step_1, step_2
    # 2. resumed with a huge --lr (the NaN run was --lr 1e3; on torch 2.11 that run falls
    # into a finite dead state instead, loss ln(vocab) and zero gradients, so the test uses a
    # rate whose first update overflows the next forward on any version): step 3 applies (its
    # gradient is finite) and
    # wrecks the weights, steps 4-6 have NaN gradient norms and are skipped, step 7 stops the run
    over = {"training": {"lr": 1e30, "steps": 8}, "checkpoint": {"resume": "auto"}}
    _, res["error"], res["out"] = _train(_config(tmp, **over))
    res["published"] = [s for s, _ in complete_checkpoints(f"{tmp}/ckpt")]
    res["metrics"] = metrics()
    dist.barrier()
    res["finite"] = _all_finite(complete_checkpoints(f"{tmp}/ckpt")[-1][1]) if dist.get_rank() == 0 else None
    dist.barrier()
    # 3. the last published checkpoint loads; --train-iters at its step: one line, nothing trained
    over = {"training": {"lr": 1e30, "steps": 6}, "checkpoint": {"resume": "auto"}}
    res["done_losses"], res["done_error"], res["done_out"] = _train(_config(tmp, **over))
    # 4. from the last good checkpoint, a peak lr of 1e-4 and one more step
    over = {"training": {"lr": 1e-4, "steps": 3, "seed": 5}, "checkpoint": {"load": f"{tmp}/ckpt/step_00000002"}}
    res["lr_losses"], res["lr_error"], res["lr_out"] = _train(_config(tmp, **over))
    res["lr_metrics"] = metrics()
    return res


def test_nonfinite_steps_skipped_stopped_never_saved_and_a_resume_takes_the_new_lr(tmp_path):
    from dtensor_parallel.trainer.schedule import lr_at

    r0, r1 = run_distributed(2, _blow_up_then_resume, str(tmp_path))
    # every rank stops the same way, at the 4th non-finite step in a row (3 skipped)
    assert r0["error"] == r1["error"] and r0["error"].startswith("NonFiniteError"), r0["error"]
    assert "4 steps in a row, 4-7" in r0["error"] and "--max-nonfinite-steps 3" in r0["error"]
    assert r0["out"].count("skipped:") == 3
    # no NaN step was applied or saved: the newest published checkpoint, read whole, is finite
    assert r0["published"] == [1, 2, 3, 4, 5, 6], r0["published"]
    assert r0["finite"]
    recs = r0["metrics"]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all(r["grad_norm"] is not None and "skipped" not in r for r in recs[:3])
    assert all(r["grad_norm"] is None and r["skipped"] for r in recs[3:])
    assert [r["skipped_steps"] for r in recs] == [0, 0, 0, 1, 2, 3]
    # the asked peak is the lr used: step 3 is the schedule's step 2 of peak 1e30, warmup 1, 8 steps
    assert recs[2]["lr"] == pytest.approx(lr_at(2, lr=1e30, min_lr=0.0, warmup_steps=1, total_steps=8), rel=1e-9)
    assert "--lr 1e+30 (the checkpoint's: 0.003)" in r0["out"]

    assert r0["done_error"] is None and r0["done_losses"] == [], r0["done_error"]
    done = [line for line in r0["done_out"].splitlines() if "nothing to do" in line]
    assert len(done) == 1 and "step_00000006 is at step 6 and --train-iters is 6" in done[0], r0["done_out"]

    # from the last good checkpoint: one line per changed flag, and the asked peak 1e-4 is used
    assert r0["lr_error"] is None, r0["lr_error"]
    assert len(r0["lr_losses"]) == 1 and math.isfinite(r0["lr_losses"][0])
    changed = [line.split("resumed with ")[1] for line in r0["lr_out"].splitlines() if "resumed with" in line]
    assert sorted(changed) == sorted([
        "--lr 0.0001 (the checkpoint's: 0.003): the LR schedule's peak, from step 3 on",
        "--train-iters 3 (the checkpoint's: 2): the run's length: the LR decays to --min-lr at the new last "
        "step, from step 3 on",
        "--seed 5 (the checkpoint's: 0): the data order (synthetic data: another Markov chain); weights, "
        "moments and RNG states come from the checkpoint, from step 3 on"]), changed
    step3 = [r for r in r0["lr_metrics"] if r["step"] == 3]
    assert len(step3) == 1
    assert step3[0]["lr"] == pytest.approx(lr_at(2, lr=1e-4, min_lr=0.0, warmup_steps=1, total_steps=3), rel=1e-9)


# ---- the decision is the same on every rank ----------------------------------------------
def _guard_votes() -> tuple[list[bool], str]:
    import torch.distributed as dist

    from dtensor_parallel.trainer.nonfinite import NonFiniteError, NonFiniteGuard, state_is_finite

    rank = dist.get_rank()
    guard = NonFiniteGuard(limit=1, device=torch.device("cpu"))
    finite, nan = torch.tensor(2.0), torch.tensor(float("nan"))
    votes = [guard.check(1, nan if rank == 1 else finite, finite),  # only rank 1 sees it: all skip
             guard.check(2, finite, finite),  # resets the count
             guard.check(3, finite, torch.tensor(float("inf")) if rank == 0 else finite)]
    p = torch.nn.Parameter(torch.ones(3))
    if rank == 1:
        p.data[1] = float("inf")
    votes.append(state_is_finite([p], None, torch.device("cpu")))
    try:
        guard.check(4, finite if rank == 0 else nan, finite)  # 2 in a row > limit 1
    except NonFiniteError as e:
        return votes, str(e)
    return votes, ""


def test_nonfinite_decision_is_agreed_over_the_ranks():
    (v0, e0), (v1, e1) = run_distributed(2, _guard_votes)
    assert v0 == v1 == [False, True, False, False]
    assert e0 == e1 and "2 steps in a row, 3-4 (loss nan, grad norm 2 on rank 1)" in e0, e0


# ---- metrics.jsonl after a crash ------------------------------------------------------------
def test_metrics_survive_a_torn_last_line(tmp_path):
    from dtensor_parallel.trainer.metrics import MetricsWriter, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    with pytest.warns(UserWarning, match="torn last line"):
        assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with MetricsWriter(path, resume_step=2) as w:  # a resume from step 2: steps 3 and the torn 4 go
            w.write({"step": 3, "loss": 0.5})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert not list(tmp_path.glob(".*.tmp"))
    if os.path.exists("/dev/full"):  # rank 0 alone writes metrics: a full disk warns, never raises (a hang)
        w = MetricsWriter(tmp_path / "m2.jsonl")
        w._file.close()
        w._file = open("/dev/full", "w")
        with pytest.warns(UserWarning, match="metrics are no longer written .disk full at /dev/full"):
            w.write({"step": 1})
        w.write({"step": 2})
        w.close()


# ---- --save is checked before any rank starts; a full disk is named -------------------------
def test_unwritable_save_rejected_before_launch(tmp_path, capsys):
    from dtensor_parallel.cli import main as cli_main

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    rc = cli_main(["train", str(REPO / "recipes" / "debug.toml"), "--nproc-per-node", "2", "--train-iters", "1",
                   "--lr-warmup-iters", "0", "--save", str(blocker / "ckpt"),
                   "--metrics", str(tmp_path / "m.jsonl")])  # (were it not caught: a 1-step run on 2 ranks)
    err = capsys.readouterr().err
    assert rc == 2 and f"--save {blocker / 'ckpt'} is not a writable directory" in err, err
    assert len(err.strip().splitlines()) == 1


def test_disk_full_recognized_behind_torch_short_write(tmp_path, monkeypatch):
    from torch.distributed.checkpoint.api import CheckpointException

    from dtensor_parallel.trainer import storage

    # what a full disk looks like through DCP: torch's zip writer hides ENOSPC behind a short write
    torn = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    short = CheckpointException("CheckpointException ranks:dict_keys([0])", {0: (torn, [])})
    monkeypatch.setattr(storage, "free_bytes", lambda p: 4096)
    full = storage.disk_full_error(short, tmp_path)
    assert full is not None and f"disk full at {tmp_path}" in str(full) and full.errno == 28
    monkeypatch.setattr(storage, "free_bytes", lambda p: 10 * 2 ** 30)  # plenty left: some other failure
    assert storage.disk_full_error(short, tmp_path) is None
    assert storage.disk_full_error(ValueError("bad shape"), tmp_path) is None


def _save_onto_a_full_disk(tmp: str) -> str:
    import torch.distributed.checkpoint.filesystem as fs

    create = fs.FileSystem.create_stream

    @contextlib.contextmanager
    def full_disk(self, path, mode):  # every rank's shard file lands on /dev/full (ENOSPC)
        if str(path).endswith(".distcp"):
            with open("/dev/full", mode) as f:
                yield f
        else:
            with create(self, path, mode) as f:
                yield f

    fs.FileSystem.create_stream = full_disk
    try:
        _, error, _ = _train(_config(tmp, training={"lr": 1e-3, "steps": 1, "warmup_steps": 0}))
    finally:
        fs.FileSystem.create_stream = create
    return error


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_while_saving_is_named(tmp_path):
    e0, e1 = run_distributed(2, _save_onto_a_full_disk, str(tmp_path))
    assert e0 == e1 and e0.startswith("DiskFullError") and f"disk full at {tmp_path / 'ckpt'}" in e0, e0
