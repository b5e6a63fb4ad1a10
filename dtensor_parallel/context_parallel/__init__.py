"""Context parallelism on the "cp" dim: zigzag sequence sharding and ring attention,
applied to the attention call sites the plan names (``apply_context_parallel``)."""

from .attention import RingAttentionMode, apply_context_parallel
from .sharding import zigzag_indices

__all__ = ["RingAttentionMode", "apply_context_parallel", "zigzag_indices"]
