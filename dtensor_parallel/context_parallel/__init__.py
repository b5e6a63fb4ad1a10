"""Context parallelism on the "cp" dim: zigzag sequence sharding and ring attention."""

from .attention import attention, context_parallel_region
from .sharding import local_positions, zigzag_indices

__all__ = ["attention", "context_parallel_region", "local_positions", "zigzag_indices"]
