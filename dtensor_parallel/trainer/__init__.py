"""Recipe-driven training: ``dtensor-parallel train recipes/debug.toml``.

config (TOML + Megatron flags -> TrainConfig) -> data (token file / synthetic stream)
-> schedule (LR, AdamW) -> loop (the steps) -> metrics (JSONL, progress line, MFU).
"""

from .config import TrainConfig, config_from_dict, load_config
from .loop import train

__all__ = ["TrainConfig", "config_from_dict", "load_config", "train"]
