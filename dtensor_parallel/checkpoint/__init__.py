"""Checkpoints: sharded save/load through torch.distributed.checkpoint with resharding
across layouts (:mod:`.dcp` loads, :mod:`.saver` saves), atomic publication
(:mod:`.atomic`), content hashes checked before a load (:mod:`.manifest`), DCP's index
read without running code (:mod:`.safe_metadata`), ``--resume auto`` (:mod:`.resume`),
Hugging Face Llama safetensors import/export into our Llama (:mod:`.hf`), and transformers
models' ``save_pretrained`` folders loaded into their shards (:mod:`.hf_pretrained`)."""

from .atomic import CorruptCheckpointError, complete_checkpoints, latest_checkpoint
from .dcp import load_checkpoint, model_state_dict, optimizer_state_dict
from .resume import choose_resume_checkpoint
from .saver import Checkpointer, save_checkpoint
from .hf import export_hf, hf_config, import_hf, model_args_from_hf
from .hf_pretrained import LoadResult, load_pretrained

__all__ = ["Checkpointer", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "complete_checkpoints",
           "choose_resume_checkpoint", "CorruptCheckpointError",
           "model_state_dict", "optimizer_state_dict", "import_hf", "export_hf", "hf_config",
           "model_args_from_hf", "load_pretrained", "LoadResult"]
