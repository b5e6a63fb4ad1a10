"""Llama 3 reference model, the whole of it in one file.

RMSNorm, rotary embeddings with the Llama 3.1 frequency scaling, grouped-query attention,
SwiGLU feed-forward, untied output head. Flavours follow the published shapes
(Llama 3 paper, Table 3; Meta's ``params.json``).

Parallel-friendly by construction:

- build on the meta device (``with torch.device("meta")``), parallelize, then call
  :meth:`Llama.init_weights` so each rank initializes only its shards;
- the local head count is read from the tensor shape (``view(b, s, -1, head_dim)``), never
  from a global constant, so tensor parallelism needs no model change;
- layers live in a ``ModuleDict`` keyed by layer index, so a pipeline stage can drop
  layers and keep the original parameter names;
- positions come in as ``position_ids`` (``arange`` when absent), so context parallelism
  passes each zigzag shard its true positions; attention is a plain SDPA call, which the
  context-parallel step turns into ring attention at this module only;
- packed documents come in as ``document_ids`` (None: one document per sequence), and
  attention then masks across document boundaries (``document_attention.py``);
- it imports nothing of the library's strategies: its default plan (blocks and rules) is
  data in ``dtensor_parallel/plans/llama.py``, so
  ``parallelize(llama, mesh, ParallelPlan(sequence_parallel=True))`` needs no rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..document_attention import document_causal_attention

from .. import init
from .moe import MoE, MoEArgs


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    multiple_of: int = 1024
    ffn_dim_multiplier: float | None = 1.3
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1 rope scaling (factor 8, low 1, high 4, original context 8192); None = off
    rope_scaling_factor: float | None = 8.0
    rope_scaling_type: str = "llama3"  # or "linear": every frequency / factor
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    max_seq_len: int = 8192
    ffn_hidden: int | None = None  # explicit dense SwiGLU size (else derived as Meta does)
    moe: MoEArgs | None = None  # MoE feed-forward in every block from n_dense_layers on
    n_dense_layers: int = 0  # leading blocks that keep a dense feed-forward (DeepSeek-V3: 3)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.moe is not None and layer_id >= self.n_dense_layers

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU hidden size as in Meta's reference: 2/3 of 4*dim, scaled, rounded up."""
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self, active: bool = False) -> int:
        """All parameters, or (``active``) those one token uses: top-k of the experts."""
        d, hd, f = self.dim, self.head_dim, self.ffn_hidden_dim
        attn = d * self.n_heads * hd * 2 + d * self.n_kv_heads * hd * 2
        total = 2 * self.vocab_size * d + d
        for layer in range(self.n_layers):
            total += attn + 2 * d
            if self.is_moe_layer(layer):
                m = self.moe
                experts = m.top_k if active else m.n_experts
                total += d * m.n_experts + 3 * d * m.hidden_dim * (experts + m.n_shared_experts)
            else:
                total += 3 * d * f
        return total


MOE_FLAVOURS: dict[str, ModelArgs] = {
    "debug-moe": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048, multiple_of=64,
                           ffn_dim_multiplier=None, rope_theta=10000.0, rope_scaling_factor=None,
                           max_seq_len=2048, moe=MoEArgs(n_experts=8, top_k=2, hidden_dim=256)),
    # Mixtral 8x7B (Jiang et al. 2024): 46.7B parameters, 12.9B active per token
    "mixtral-8x7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=32000,
                              rope_theta=1e6, rope_scaling_factor=None, max_seq_len=32768,
                              ffn_hidden=14336, moe=MoEArgs(n_experts=8, top_k=2, hidden_dim=14336)),
    # DeepSeek-V3's sizes (DeepSeek-AI 2024) on our GQA attention instead of MLA: 61 layers,
    # the first 3 dense (18432), then 256 routed experts of 2048 (top-8, sigmoid scores,
    # aux-loss-free bias, a small sequence aux loss) plus one shared expert
    "deepseek-v3-shaped": ModelArgs(
        dim=7168, n_layers=61, n_heads=128, n_kv_heads=128, vocab_size=129280, rope_theta=10000.0,
        rope_scaling_factor=None, max_seq_len=4096, ffn_hidden=18432, n_dense_layers=3,
        moe=MoEArgs(n_experts=256, top_k=8, hidden_dim=2048, n_shared_experts=1, score_func="sigmoid",
                    load_balance="seq_aux_loss", aux_loss_coeff=1e-4, expert_bias=True)),
}

LLAMA3_FLAVOURS: dict[str, ModelArgs] = {
    "debug": ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=2048,
                       multiple_of=64, ffn_dim_multiplier=None, rope_theta=10000.0,
                       rope_scaling_factor=None, max_seq_len=2048),
    "8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024,
                    ffn_dim_multiplier=1.3, max_seq_len=131072),
    "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
                     ffn_dim_multiplier=1.3, max_seq_len=131072),
    "405B": ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
                      ffn_dim_multiplier=1.2, max_seq_len=131072),
}


def llama3_args(flavour: str, **overrides) -> ModelArgs:
    """A flavour's args (Llama 3 dense, or the MoE flavours) with overrides."""
    flavours = {**LLAMA3_FLAVOURS, **MOE_FLAVOURS}
    if flavour not in flavours:
        raise ValueError(f"unknown flavour {flavour!r}; choose one of {list(flavours)}")
    return replace(flavours[flavour], **overrides)


def rope_cache(args: ModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """(max_seq_len, head_dim/2, 2) table of cos and sin, with Llama 3.1 frequency scaling
    (or linear: every frequency divided by the factor).

    Scaling (Llama 3.1): wavelengths shorter than original_len/high_freq_factor keep their
    frequency, longer than original_len/low_freq_factor are divided by ``factor``, and the
    band between is interpolated smoothly.
    """
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float64) / hd))
    if args.rope_scaling_type not in ("llama3", "linear"):
        raise ValueError(f"rope_scaling_type={args.rope_scaling_type!r}: choose 'llama3' or 'linear'")
    if args.rope_scaling_factor is not None and args.rope_scaling_type == "linear":
        freqs = freqs / args.rope_scaling_factor  # position interpolation
    elif args.rope_scaling_factor is not None:
        factor = args.rope_scaling_factor
        low_wavelen = args.rope_original_max_len / args.rope_low_freq_factor
        high_wavelen = args.rope_original_max_len / args.rope_high_freq_factor
        wavelen = 2 * math.pi / freqs
        smooth = (args.rope_original_max_len / wavelen - args.rope_low_freq_factor) / (
            args.rope_high_freq_factor - args.rope_low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, freqs / factor, freqs)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        freqs = torch.where(mid, (1 - smooth) * freqs / factor + smooth * freqs, scaled)
    t = torch.arange(args.max_seq_len, device=device, dtype=torch.float64)
    angles = torch.outer(t, freqs)  # (s, hd/2)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()  # (s, hd/2, 2)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) as in Meta's reference. x: (b, s, h, d);
    rope: (s, d/2, 2) or (b, s, d/2, 2) cos/sin rows of the tokens' positions."""
    b, s, h, d = x.shape
    if rope.dim() == 3:
        rope = rope[:s]  # a table from position 0 (the first s rows)
    xp = x.float().reshape(b, s, h, d // 2, 2)  # (b, s, h, d/2, 2)
    cos = rope[..., None, :, 0]  # ([b,] s, 1, d/2)
    sin = rope[..., None, :, 1]
    x0, x1 = xp[..., 0], xp[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # (b, s, h, d/2, 2)
    return out.flatten(3).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x / rms(x) * weight``, fp32 inside: one fused kernel each way on CUDA (eager; six
        element-wise and reduction kernels before, 25 ms of an 8B-shaped one-GPU step against
        TorchTitan's 7 with ``nn.RMSNorm``)."""
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, document_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, s, dim); rope: the cos/sin rows of the tokens' positions, (s, d/2, 2) or
        (b, s, d/2, 2); document_ids (b, s) or None, with the positions (document attention
        under context parallelism masks by them)."""
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim)  # (b, s, local heads, d)
        k = self.wk(x).view(b, s, -1, self.head_dim)  # (b, s, local kv heads, d)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (b, h, s, d)
        if document_ids is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        else:
            out = document_causal_attention(q, k, v, document_ids, position_ids=position_ids)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = (MoE(args.dim, args.moe) if args.is_moe_layer(layer_id)
                             else FeedForward(args.dim, args.ffn_hidden_dim))

    def forward(self, h: torch.Tensor, rope: torch.Tensor, document_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.attention(self.attention_norm(h), rope, document_ids, position_ids)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Llama 3. ``forward(tokens (b, s), position_ids (b, s) or (s,) = arange(s),
    document_ids (b, s) = None) -> logits (b, s, vocab)``; a pipeline stage without the
    embedding takes hidden states (b, s, dim)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope", rope_cache(args), persistent=False)

    @classmethod
    def from_flavour(cls, flavour: str, **overrides) -> "Llama":
        return cls(llama3_args(flavour, **overrides))

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                document_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.tok_embeddings(tokens)  # (b, s, dim); a pipeline stage without it passes hidden states on
        if position_ids is None:
            rope = self.rope[:tokens.shape[1]]  # (s, d/2, 2)
        else:  # the tokens' global positions (this rank's zigzag chunks under CP)
            rope = self.rope[position_ids]  # ([b,] s, d/2, 2)
        for layer in self.layers.values():
            h = layer(h, rope, document_ids, position_ids)
        return self.output(self.norm(h))

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None, seed: int = 0) -> None:
        """Initialize every parameter in place; works on sharded (DTensor) parameters and
        gives the same weights for the same seed in every layout (see ``init.py``).

        Embedding N(0, 1); q/k/v/w1 N(0, 0.02); the projections back into the residual
        stream (wo, w2) and w3 with the depth-scaled std 0.02 / sqrt(2 (layer + 1)), as in
        TorchTitan and GPT-2; norms 1; output head N(0, dim^-1/2).
        """
        device = buffer_device or next((b.device for b in self.buffers()), None)
        if device is None or torch.device(device).type == "meta":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.rope = rope_cache(self.args, device=device)
        for module in self.modules():  # a buffer, not a parameter: zero (to_empty left garbage)
            if hasattr(module, "expert_bias"):
                module.expert_bias.zero_()
        for name, p in self.named_parameters():
            parts = name.split(".")
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif parts[0] == "tok_embeddings":
                init.normal_(p, name, seed, std=1.0)
            elif parts[0] == "output":
                init.normal_(p, name, seed, std=self.args.dim ** -0.5)
            elif parts[-1] in ("w2", "w3") or parts[-2] in ("wo", "w2", "w3"):  # MoE experts: (E, ., .)
                init.normal_(p, name, seed, std=0.02 / math.sqrt(2 * (int(parts[1]) + 1)))
            else:
                init.normal_(p, name, seed, std=0.02)
