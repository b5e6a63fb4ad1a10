"""Checkpoints that never trust a file (issue 20, items 1, 4, 5): an asynchronous save is
published as soon as it is written, by rank 0 alone while the other ranks train; each
checkpoint carries content hashes checked before a load (a flipped byte in a weight shard,
a flipped digit in checkpoint.json) with ``--resume auto`` falling back to the newest one
that verifies and saying why; DCP's ``.metadata`` is read by a restricted unpickler, so a
crafted one fails with an error naming the class instead of running its payload."""

from __future__ import annotations

import json
import os
import pickle
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from dtensor_parallel.checkpoint import (Checkpointer, CorruptCheckpointError, atomic, choose_resume_checkpoint,
                                         load_checkpoint, manifest, save_checkpoint)
from dtensor_parallel.checkpoint.safe_metadata import (ALLOWED_GLOBALS, SafeFileSystemReader,
                                                       UnsafeCheckpointError, read_dcp_metadata)

from .harness import run_distributed
from .test_checkpoint import _build, _step


def _tiny(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


@contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ---- item 5: no code runs from a checkpoint -----------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _rehash(path: Path) -> None:
    """What an attacker who rewrites a file can also do: make the manifest agree with it."""
    mf = json.loads((path / atomic.MANIFEST_FILE).read_text())
    for name in mf["files"]:
        mf["files"][name] = manifest.hash_file(path / name)
    (path / atomic.MANIFEST_FILE).write_text(json.dumps(mf))


def test_crafted_metadata_is_refused_and_runs_nothing(tmp_path):
    model, opt = _tiny()
    with _quiet():
        path = save_checkpoint(tmp_path / "ck", 1, model, opt)
    md_file = path / atomic.DCP_META_FILE
    genuine = pickle.loads(md_file.read_bytes())  # our own file: trusted here, to compare
    assert read_dcp_metadata(path) == genuine  # the admitted classes are enough for a real one
    marker = tmp_path / "PWNED"
    md_file.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CorruptCheckpointError, match="manifest.json"):  # unpatched: its hash differs
        load_checkpoint(path, _tiny(1)[0])
    _rehash(path)
    fresh, _ = _tiny(1)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(UnsafeCheckpointError, match=r"refers to (posix|os)\.system.*refusing to unpickle"):
        load_checkpoint(path, fresh)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):  # DCP's own load path
        SafeFileSystemReader(str(path)).read_metadata()
    from dtensor_parallel.checkpoint.hf_from_checkpoint import _global_shapes  # export-hf's reader

    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        _global_shapes(path)
    assert not marker.exists(), "unpickling the crafted .metadata ran its payload"
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())
    md_file.write_bytes(pickle.dumps({"x": eval}))  # any other global is refused by name too
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.eval"):
        read_dcp_metadata(path)
    assert ("torch.distributed.checkpoint.metadata", "Metadata") in ALLOWED_GLOBALS


# ---- items 1 and 4 on two ranks -------------------------------------------------------------
def _flip(f: Path, at: int, n: int = 1) -> None:
    data = bytearray(f.read_bytes())
    for i in range(at, at + n):
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def _two_ranks(root: str) -> dict:
    root = Path(root)
    rank = dist.get_rank()
    pm, opt, sched = _build({"dp_shard": 2}, {})
    _step(pm, opt, sched, 0)
    out: dict = {}

    # item 1: published by rank 0 as soon as written; rank 1 joins no collective meanwhile
    ck = Checkpointer(root, interval=1, async_save=True)
    ck.save(1, pm, opt, sched, data={"step": 1})
    deadline = time.time() + 60
    while rank == 0 and not (root / atomic.step_name(1)).is_dir() and time.time() < deadline:
        time.sleep(0.02)
    out["published_before_wait"] = (root / atomic.step_name(1)).is_dir()
    dist.barrier()
    ck.close()
    good = pm.full_state_dict()
    _step(pm, opt, sched, 1)
    save_checkpoint(root, 2, pm, opt, sched, data={"step": 2})
    if rank == 0:
        (atomic.tmp_path(root, 3)).mkdir()  # a save a crash interrupted
    dist.barrier()

    # item 4: a flipped byte in a weight shard: named with its file and tensors, nothing loaded
    step2 = root / atomic.step_name(2)
    shard = step2 / "__1_0.distcp"  # rank 1's file: verified by rank 1 alone, the error reaches both
    saved = shard.read_bytes()
    if rank == 0:
        _flip(shard, len(saved) // 2, 256)
    dist.barrier()
    target, topt, tsched = _build({"dp_shard": 2}, {}, seed=9)
    before = target.full_state_dict()
    try:
        load_checkpoint(step2, target, topt, tsched)
    except CorruptCheckpointError as e:
        out["shard_error"] = str(e)
    out["unchanged"] = all(torch.equal(target.full_state_dict()[k], v) for k, v in before.items())

    # --resume auto: skips the unfinished save and the damaged step 2, takes step 1
    said: list[str] = []
    with _quiet():
        chosen = choose_resume_checkpoint([root], target_step=5, log=said.append)
        meta = load_checkpoint(chosen, target, topt, tsched)
    out["chosen"], out["said"] = str(chosen), said
    out["loaded_good"] = all(torch.equal(target.full_state_dict()[k], v) for k, v in good.items())
    said_done: list[str] = []
    choose_resume_checkpoint([root], target_step=meta["step"], log=said_done.append)
    out["said_done"] = said_done

    # a flipped digit in checkpoint.json (the step): caught before it is believed
    if rank == 0:
        shard.write_bytes(saved)
        j = step2 / atomic.META_FILE
        j.write_text(j.read_text().replace('"step": 2', '"step": 6', 1))
    dist.barrier()
    try:
        load_checkpoint(step2, target, topt, tsched)
    except CorruptCheckpointError as e:
        out["json_error"] = str(e)
    if rank == 0:
        _flip(root / atomic.step_name(1) / "__0_0.distcp", 100)
    dist.barrier()
    try:
        choose_resume_checkpoint([root], log=lambda m: None)
    except CorruptCheckpointError as e:
        out["none_verifies"] = str(e)
    return out


def test_async_publication_integrity_and_resume_fallback(tmp_path):
    root = tmp_path / "ck"
    outs = run_distributed(2, _two_ranks, str(root))
    out = outs[0]
    assert out["published_before_wait"], "the asynchronous save was not published once written"
    assert outs[0]["shard_error"] == outs[1]["shard_error"], "ranks must reject a checkpoint the same way"
    e = out["shard_error"]
    assert f"{root / atomic.step_name(2) / '__1_0.distcp'} is corrupt: bytes" in e and "differ from their sha256" in e
    assert "tensor" in e and "'model." in e, e  # the tensors stored in the damaged bytes
    assert out["unchanged"]
    assert out["chosen"] == str(root / atomic.step_name(1)) and out["loaded_good"]
    said = "\n".join(out["said"])
    assert f"skipping {atomic.tmp_path(root, 3)}: an unfinished save" in said, said
    assert f"skipping {root / atomic.step_name(2)}: checkpoint file" in said and "falling back" in said, said
    assert f"taking {root / atomic.step_name(1)} (step 1)" in said, said
    assert "nothing to do" not in said and "nothing to do" in "\n".join(out["said_done"])
    assert outs[1]["said"] == [], "only rank 0 reports"
    assert "checkpoint.json is corrupt" in out["json_error"], out["json_error"]
    assert "no checkpoint under" in out["none_verifies"] and "2 tried" in out["none_verifies"]


def test_checkpoint_without_manifest_loads_with_a_warning(tmp_path):
    """Checkpoints saved before manifests existed still load (and resume), said so."""
    model, opt = _tiny()
    with _quiet():
        path = save_checkpoint(tmp_path / "ck", 1, model, opt)
    (path / atomic.MANIFEST_FILE).unlink()
    fresh, fopt = _tiny(1)
    with pytest.warns(UserWarning, match="no manifest.json"):
        load_checkpoint(path, fresh, fopt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    said: list[str] = []
    assert choose_resume_checkpoint([tmp_path / "ck"], log=said.append) == path
    assert "not verified" in said[-1]


def _save_into_a_file(root: str) -> str:
    model, opt = _tiny()
    try:
        Checkpointer(root).save(1, model, opt)
    except RuntimeError as e:
        return str(e)
    return "saved"


def test_a_save_rank_0_cannot_start_fails_on_every_rank(tmp_path):
    """Rank 0 alone creates the directory and writes checkpoint.json: when that fails (here
    --save is a file; a full disk alike) every rank raises its error, none waits in the
    save's collectives until the timeout."""
    (tmp_path / "a_file").write_text("")
    errors = run_distributed(2, _save_into_a_file, str(tmp_path / "a_file"))
    assert errors[0] == errors[1] and "preparing the checkpoint" in errors[0], errors
