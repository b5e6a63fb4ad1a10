"""Reference models: plain ``nn.Module``s that import nothing of the strategies. Their
default plans (blocks, rules) are data in ``dtensor_parallel/plans``."""

from .llama import LLAMA3_FLAVOURS, Llama, ModelArgs, llama3_args

__all__ = ["LLAMA3_FLAVOURS", "Llama", "ModelArgs", "llama3_args"]
