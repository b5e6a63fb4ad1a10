"""Checkpoints: sharded save/load through torch.distributed.checkpoint with resharding
across layouts (:mod:`.dcp`), atomic publication and ``--resume auto`` (:mod:`.atomic`),
Hugging Face Llama safetensors import/export into our Llama (:mod:`.hf`), and transformers
models' ``save_pretrained`` folders loaded into their shards (:mod:`.hf_pretrained`)."""

from .atomic import complete_checkpoints, latest_checkpoint
from .dcp import Checkpointer, load_checkpoint, model_state_dict, optimizer_state_dict, save_checkpoint
from .hf import export_hf, hf_config, import_hf, model_args_from_hf
from .hf_pretrained import LoadResult, load_pretrained

__all__ = ["Checkpointer", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "complete_checkpoints",
           "model_state_dict", "optimizer_state_dict", "import_hf", "export_hf", "hf_config",
           "model_args_from_hf", "load_pretrained", "LoadResult"]
