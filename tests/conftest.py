"""Without a GPU, Triton kernels run in the interpreter: the variable must be set before
triton is first imported (also inherited by the gloo worker processes)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
