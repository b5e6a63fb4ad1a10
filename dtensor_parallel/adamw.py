"""AdamW with its moments in bf16: 12 bytes a parameter of training state instead of 16.

With fp32 weights, fp32 gradients and torch's AdamW, every parameter costs 16 bytes before
any activation; the two moments are half of it. ``AdamW(state_dtype=torch.bfloat16)`` keeps
them in bf16 (Megatron-Core's precision-aware optimizer offers the same,
``--exp-avg-dtype bf16 --exp-avg-sq-dtype bf16``): 4 bytes a parameter less, a quarter of
the state. The update itself runs in fp32 from the fp32 weight and gradient, as torch's AdamW
does; only the stored moments are rounded, and stochastically: rounding to nearest would
freeze the second moment wherever ``beta2 * v`` moves it by less than half a bf16 unit
(every ``beta2 > 0.996``, torch's default 0.999 included). ``triton_kernels/adamw.py`` says
how the rounding is done and why it depends on the value only, never on its position or
rank: replicated shards stay bit-equal, and a sharded run rounds as one device does.

``state_dtype=torch.float32`` is torch's AdamW (same update, same state keys ``step``,
``exp_avg``, ``exp_avg_sq``, so checkpoints move between the two; a load casts the moments to
this optimizer's dtype).

Parameters may be DTensors (each rank updates its local shard; the moments are created
placed like their parameters, so checkpoints reshard them like weights). On CUDA the update is
one Triton kernel launch per parameter that reads and writes each tensor once; elsewhere (CPU,
the simulated ranks of the tests) the same math and the same rounding in torch ops, one
parameter at a time."""

from __future__ import annotations

from typing import Iterable

import torch
from torch.distributed.tensor import DTensor

_STATE_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                 "bfloat16": torch.bfloat16}
_KERNELS = ("auto", "triton", "torch")
_MASK32 = 0xFFFFFFFF


def state_dtype_of(name: str | torch.dtype) -> torch.dtype:
    """``"fp32"``/``"bf16"`` (or the dtype) -> the dtype; anything else is an error naming the choices."""
    if isinstance(name, torch.dtype):
        if name in (torch.float32, torch.bfloat16):
            return name
    elif name in _STATE_DTYPES:
        return _STATE_DTYPES[name]
    raise ValueError(f"optimizer state dtype {name!r}: choose 'fp32' (torch's AdamW) or 'bf16' (the moments in "
                     f"bf16 with stochastic rounding, 4 bytes a parameter less)")


def mix32(x):
    """lowbias32 on 32-bit values held in int64 tensors or Python ints (the kernel's ``_mix32``)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def rounding_keys(step: int) -> tuple[int, int]:
    """The keys of optimizer step ``step`` for the first and second moment (< 2**31, so they
    reach the kernel as int32). Every rank derives the same ones."""
    return mix32(2 * step + 0x5BD1) & 0x7FFFFFFF, mix32(2 * step + 0x5BD2) & 0x7FFFFFFF


def round_to_bf16(x: torch.Tensor, key: int) -> torch.Tensor:
    """fp32 -> bf16 with the kernel's stochastic rounding (bit-equal to it for the same inputs)."""
    bits = x.view(torch.int32).to(torch.int64) & _MASK32
    noise = mix32((bits >> 16) ^ key) & 0xFFFF
    kept = ((bits + noise) & 0xFFFF0000).to(torch.int32)  # wraps to the int32 bit pattern (no NaN is near)
    rounded = kept.view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded).to(torch.bfloat16)


def _adamw_step_torch(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step, key_m, key_v) -> None:
    """The kernel's update in torch ops (fp32 temporaries of one parameter)."""
    g32 = g.float()
    m32 = m.float()
    m32 += (1 - beta1) * (g32 - m32)
    v32 = v.float() * beta2 + (1 - beta2) * g32 * g32
    denom = v32.sqrt() / (1.0 - beta2 ** step) ** 0.5 + eps
    p32 = p.float() * (1.0 - lr * weight_decay) - (lr / (1.0 - beta1 ** step)) * (m32 / denom)
    p.copy_(p32)
    if m.dtype == torch.bfloat16:
        m.copy_(round_to_bf16(m32, key_m))
        v.copy_(round_to_bf16(v32, key_v))
    else:
        m.copy_(m32)
        v.copy_(v32)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if isinstance(t, DTensor) else t


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose moments are stored in ``state_dtype``.

    ``kernel``: "auto" (the Triton kernel where it applies: CUDA tensors, contiguous, Triton
    importable; else torch ops), "triton" (the kernel or an error saying why not), "torch".
    Only AdamW's plain form: no ``amsgrad``, ``maximize`` or tensor learning rates."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, state_dtype: str | torch.dtype = "bf16",
                 kernel: str = "auto"):
        if not 0.0 <= lr:
            raise ValueError(f"lr={lr} must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas={betas}: each must be in [0, 1)")
        if not eps > 0.0:
            raise ValueError(f"eps={eps} must be > 0")
        if kernel not in _KERNELS:
            raise ValueError(f"kernel={kernel!r}: choose one of {_KERNELS}")
        self.state_dtype = state_dtype_of(state_dtype)
        self.kernel = kernel
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype, memory_format=torch.preserve_format)
        for key in ("exp_avg", "exp_avg_sq"):  # a loaded checkpoint of the other dtype
            if state[key].dtype != self.state_dtype:
                state[key] = state[key].to(self.state_dtype)
        return state

    def _kernel_for(self, tensors: tuple[torch.Tensor, ...]):
        if self.kernel == "torch" or (self.kernel == "auto" and tensors[0].device.type != "cuda"):
            return None  # ("auto" never takes the interpreter, which TRITON_INTERPRET=1 offers for CPU tensors)
        try:
            from triton_kernels import adamw as kernel
        except ImportError as e:  # triton is a dependency, but a broken install should not stop "auto"
            if self.kernel == "triton":
                raise RuntimeError(f"AdamW(kernel='triton'): Triton does not import ({e})") from e
            return None
        why = kernel.supports(*tensors)
        if why is None:
            return kernel
        if self.kernel == "triton":
            raise ValueError(f"AdamW(kernel='triton') cannot update this parameter: {why}; use kernel='auto'")
        return None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if isinstance(p, DTensor) and isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                    raise ValueError(f"a gradient is placed {p.grad.placements} but its parameter "
                                     f"{p.placements}: reduce the gradients before the step (ParallelModel "
                                     f"does this in forward_backward)")
                state = self._state(p)
                state["step"] += 1
                step = int(state["step"].item())  # a CPU tensor: no device sync
                key_m, key_v = rounding_keys(step)
                tensors = (_local(p), _local(p.grad), _local(state["exp_avg"]), _local(state["exp_avg_sq"]))
                kernel = self._kernel_for(tensors)
                run = kernel.adamw_step_ if kernel is not None else _adamw_step_torch
                run(*tensors, lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                    weight_decay=group["weight_decay"], step=step, key_m=key_m, key_v=key_v)
        return loss
