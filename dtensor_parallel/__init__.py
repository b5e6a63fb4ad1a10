"""dtensor_parallel: Megatron-Core parallelism as DTensor placements over one DeviceMesh.

    mesh = build_mesh(pp=1, dp_shard=-1, cp=1, tp=2)
    pm = parallelize(model, mesh, ParallelPlan(sequence_parallel=True))
    loss = pm.forward_backward(input_ids, labels)
"""

from .adamw import AdamW
from .document_attention import document_causal_attention
from .mesh import MESH_DIMS, ParallelDims, build_mesh
from .parallel_model import ParallelModel
from .parallelize import parallelize
from .plan import ParallelPlan

__all__ = ["AdamW", "MESH_DIMS", "ParallelDims", "ParallelModel", "ParallelPlan", "build_mesh", "document_causal_attention",
           "parallelize"]
__version__ = "0.1.0"
