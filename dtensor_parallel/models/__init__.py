"""Reference models. Each carries its own parallel plan (``parallel_defaults()``)."""

from .llama import LLAMA3_FLAVOURS, Llama, ModelArgs, llama3_args

__all__ = ["LLAMA3_FLAVOURS", "Llama", "ModelArgs", "llama3_args"]
