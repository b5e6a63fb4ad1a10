"""Expert parallelism: groups from the mesh (``groups.py``), the step that shards experts
and injects the dispatcher (``apply.py``), the dispatchers' communication and kernels
(``dispatch.py``), and the balancing statistics across ranks (``statistics.py``)."""

from .apply import apply_expert_parallel, build_dispatch, check_expert_layout, check_experts, reduce_expert_grads
from .dispatch import ParallelDispatch, dispatch_combine
from .groups import ExpertGroups, build_expert_groups, ep_fold_size, needs_expert_groups

__all__ = ["ExpertGroups", "ParallelDispatch", "apply_expert_parallel", "build_dispatch", "build_expert_groups",
           "check_expert_layout", "check_experts", "dispatch_combine", "ep_fold_size", "needs_expert_groups",
           "reduce_expert_grads"]
