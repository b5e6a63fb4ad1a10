"""A small non-Llama transformer, parallelized only through ``blocks`` and ``rules``.

GPT-2 flavoured: LayerNorm with bias, multi-head attention with biased q/v/out
projections, GELU MLP with biases, blocks in a ``ModuleList`` named ``h``, no positional
embedding (causal attention alone orders tokens). The library knows nothing of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TOY_RULES = {
    "wte": "embedding",
    "h.*.ln_1": "norm",
    "h.*.attn": "attention",  # its forward calls F.scaled_dot_product_attention: the ring runs there under CP
    "h.*.attn.c_q": "colwise",
    "h.*.attn.c_k": "colwise",
    "h.*.attn.c_v": "colwise",
    "h.*.attn.c_proj": "rowwise",
    "h.*.ln_2": "norm",
    "h.*.mlp.c_fc": "colwise",
    "h.*.mlp.c_proj": "rowwise",
    "ln_f": "norm",
    "lm_head": "head",
}
TOY_BLOCKS = "h.*"


class SelfAttention(nn.Module):
    def __init__(self, d: int, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        # no key bias: softmax is shift invariant, so its gradient is exactly zero
        self.c_q, self.c_k, self.c_v = nn.Linear(d, d), nn.Linear(d, d, bias=False), nn.Linear(d, d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (lin(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # (b, h, s, d)
                   for lin in (self.c_q, self.c_k, self.c_v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, d: int, head_dim: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, head_dim)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class ToyGPT(nn.Module):
    def __init__(self, vocab: int = 96, d: int = 32, n_layers: int = 4, n_heads: int = 4):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(Block(d, d // n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        with torch.no_grad():  # non-trivial norm parameters so their gradients are tested
            for m in self.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.1, 0.1)

    def forward(self, idx: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # no positional encoding: position_ids is accepted (the contract context parallelism
        # checks) and unused. Unmodified under PP: other stages' modules pass their input on
        x = self.wte(idx)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))
