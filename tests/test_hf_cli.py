"""From and to Hugging Face through the CLI (issue 19, item 2): a transformers-saved Llama
folder -> ``train --init-from-hf`` 3 steps in PP2 x TP2 x FSDP2 -> ``export-hf`` of the
training checkpoint -> transformers' ``from_pretrained`` with no missing or unexpected keys,
logits equal to ours on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers  # the test extra: a missing install fails collection instead of skipping

from dtensor_parallel.checkpoint import hf_config
from dtensor_parallel.cli import main as cli_main
from dtensor_parallel.models import Llama
from dtensor_parallel.models.llama import ModelArgs, llama3_args

from .harness import run_distributed

REPO = Path(__file__).resolve().parent.parent
DEBUG_RECIPE = REPO / "recipes" / "debug.toml"


def _train_from_hf(hf_dir: str, save: str, metrics: str) -> list[float]:
    """The CLI's train path inside a rank of the pool (the recipe and Megatron flags as a
    user gives them; the pool's process group stands in for torchrun's)."""
    from dtensor_parallel.trainer import load_config, train

    cfg = load_config(DEBUG_RECIPE, [
        "--init-from-hf", hf_dir, "--pipeline-model-parallel-size", "2", "--tensor-model-parallel-size", "2",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3", "--lr-warmup-iters", "1",
        "--lr", "1e-4", "--min-lr", "1e-5", "--save", save, "--metrics", metrics, "--log-interval", "3"])
    assert cfg.checkpoint.init_from_hf == hf_dir and cfg.parallel.pp == 2
    return train(cfg)


def test_hf_train_export_round_trip(tmp_path):
    args = llama3_args("debug")
    torch.manual_seed(0)
    start = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config(args, torch.float32))).float()
    start.save_pretrained(tmp_path / "hf")
    losses = run_distributed(8, _train_from_hf, str(tmp_path / "hf"), str(tmp_path / "ckpt"),
                             str(tmp_path / "metrics.jsonl"))
    assert all(len(run) == 3 for run in losses)

    assert cli_main(["export-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--dtype", "fp32",
                     "--max-shard-size", "2MB"]) == 0
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # sharded
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                      output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info

    # ours: the checkpoint read straight through DCP (no process group), an independent path
    ckpt = sorted((tmp_path / "ckpt").glob("step_*"))[-1]
    ours = Llama(ModelArgs(**json.loads((ckpt / "checkpoint.json").read_text())["model_args"]))
    ours.init_weights(buffer_device="cpu", seed=5)
    state = {f"model.{k}": v for k, v in ours.state_dict().items()}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    tokens = torch.randint(0, args.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ours(tokens), theirs(tokens).logits
    assert (got - want).norm() <= 1e-5 * want.norm()
    # it trained from the folder's weights: 3 AdamW steps at lr 1e-4 move each element by < 1e-3
    moved = (theirs.model.embed_tokens.weight - start.model.embed_tokens.weight).abs().max().item()
    assert 0 < moved < 1e-3, moved


def test_init_from_hf_errors_before_any_rank_starts(tmp_path, capsys):
    args = llama3_args("debug")
    wide = transformers.LlamaConfig(**(hf_config(args, torch.float32) | {"intermediate_size": 768}))
    transformers.LlamaForCausalLM(wide).save_pretrained(tmp_path / "wide")
    code = cli_main(["train", str(DEBUG_RECIPE), "--nproc-per-node", "4", "--init-from-hf", str(tmp_path / "wide")])
    assert code == 2
    assert "intermediate_size=768 but this model has 704" in capsys.readouterr().err
    code = cli_main(["train", str(DEBUG_RECIPE), "--init-from-hf", str(tmp_path / "wide"), "--load", str(tmp_path)])
    assert code == 2 and "keep one" in capsys.readouterr().err


def test_export_hf_errors(tmp_path, capsys):
    assert cli_main(["export-hf", str(tmp_path / "none"), str(tmp_path / "out")]) == 2
    assert "error" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    with pytest.raises(SystemExit):
        cli_main(["export-hf", str(tmp_path), str(tmp_path / "out"), "--dtype", "int8"])
