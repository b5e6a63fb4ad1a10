"""One N-dimensional DeviceMesh for every strategy.

Dims, outermost to innermost: ``("pp", "dp_replicate", "dp_shard", "cp", "tp")``.
TP is innermost so its ranks are adjacent (one NVLink island); PP is outermost because
it only sends activations point to point and may cross slow links. This is
Megatron-Core's ``tp-cp-ep-dp-pp`` order read from the other end.

Flattened views (built once, cached on the mesh):

=============  ==============================  ===========================================
view           made of                         used for
=============  ==============================  ===========================================
``dp``         dp_replicate x dp_shard          data loading: ranks that see other batches
``dp_shard_cp`` dp_shard x cp                   FSDP parameter sharding
``dp_cp``      dp_replicate x dp_shard x cp     loss and gradient reduction
=============  ==============================  ===========================================
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS: tuple[str, ...] = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
FLATTENED_VIEWS: dict[str, tuple[str, ...]] = {
    "dp": ("dp_replicate", "dp_shard"),
    "dp_shard_cp": ("dp_shard", "cp"),
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),
}


@dataclass(frozen=True)
class ParallelDims:
    """The parallel degrees, validated against the world size.

    ``dp_shard=-1`` (or ``dp_replicate=-1``, for DDP) takes whatever the other degrees
    leave of the world.
    """

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{f.name} must be an int, got {v!r}")
            if f.name in ("dp_shard", "dp_replicate"):
                if v == 0 or v < -1:
                    raise ValueError(f"{f.name} must be >= 1 or -1 (the rest of the world), got {v}")
            elif v < 1:
                raise ValueError(f"{f.name} must be >= 1, got {v}")
        if self.dp_shard == -1 and self.dp_replicate == -1:
            raise ValueError("dp_shard and dp_replicate are both -1: give one of them a number")
        rest = "dp_shard" if self.dp_shard == -1 else "dp_replicate" if self.dp_replicate == -1 else None
        if rest is not None:
            others = self.pp * self.cp * self.tp * (self.dp_replicate if rest == "dp_shard" else self.dp_shard)
            if self.world_size % others:
                raise ValueError(
                    f"{self._arith(**{rest: None})} = {others} does not divide world size "
                    f"{self.world_size}, so {rest}=-1 has no integer value: change a degree or "
                    f"the number of ranks")
            object.__setattr__(self, rest, self.world_size // others)
        product = math.prod(self.shape)
        if product != self.world_size:
            raise ValueError(
                f"{self._arith()} = {product} != world size {self.world_size}: make the product "
                f"equal the number of ranks (or pass dp_shard=-1)")

    def _arith(self, **skip) -> str:
        return " * ".join(f"{d}({getattr(self, d)})" for d in MESH_DIMS if d not in skip)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, d) for d in MESH_DIMS)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp(self) -> int:
        return self.dp * self.cp

    @property
    def dp_shard_cp(self) -> int:
        return self.dp_shard * self.cp

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh) -> "ParallelDims":
        names = mesh.mesh_dim_names
        if names is None or tuple(names) != MESH_DIMS:
            raise ValueError(
                f"expected a mesh from dtensor_parallel.build_mesh with dims {MESH_DIMS}, got "
                f"dims {names}: build the mesh with build_mesh(pp=..., dp_shard=..., tp=...)"
            )
        sizes = dict(zip(MESH_DIMS, mesh.shape))
        return cls(**sizes, world_size=math.prod(mesh.shape))


_MESHES: dict[tuple, tuple[object, DeviceMesh]] = {}


def build_mesh(
    *,
    pp: int = 1,
    dp_replicate: int = 1,
    dp_shard: int = -1,
    cp: int = 1,
    tp: int = 1,
    device_type: str | None = None,
    nccl_max_ctas: dict[str, int] | None = None,
) -> DeviceMesh:
    """Build the one mesh over the default process group.

    Degrees are checked before any process group is created, so a wrong product is a
    ``ValueError`` on every rank rather than a hang. The same degrees on the same default
    group give the same mesh object: its process groups are created once (each gloo or
    NCCL group holds threads and buffers, so rebuilding meshes in a loop would pile them up).

    ``nccl_max_ctas``: per mesh dim, the most CTAs (SMs) its NCCL communicators' kernels may
    take (NCCL's ``maxCTAs``; Megatron's ``nccl_comm_cfgs``), e.g. ``{"pp": 2}``: the pipeline's
    P2P kernels, which interleaved schedules run beside the compute (RESULTS.md, issue 24),
    then hold 2 SMs; pair it with ``ParallelPlan(pipeline_sm_carveout=2)``. CUDA meshes only.
    """
    caps = _check_nccl_caps(nccl_max_ctas)
    if not dist.is_initialized():
        raise RuntimeError(
            "build_mesh needs the default process group: call "
            "torch.distributed.init_process_group() first (torchrun sets up the environment)"
        )
    dims = ParallelDims(pp=pp, dp_replicate=dp_replicate, dp_shard=dp_shard, cp=cp, tp=tp,
                        world_size=dist.get_world_size())
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"
    if caps and device_type != "cuda":
        raise ValueError(f"nccl_max_ctas={nccl_max_ctas} caps NCCL communicators, but this mesh is "
                         f"{device_type!r} (gloo): leave nccl_max_ctas out on CPU ranks")
    world = dist.distributed_c10d._get_default_group()
    key = (dims.shape, device_type, caps)
    cached = _MESHES.get(key)
    if cached is not None and cached[0] is world:  # not a mesh of an earlier, destroyed group
        return cached[1]
    override = None
    if caps:
        override = {}
        for name, n in caps:
            opts = dist.ProcessGroupNCCL.Options()
            opts.config.max_ctas = n
            override[name] = ("nccl", opts)
    mesh = init_device_mesh(device_type, dims.shape, mesh_dim_names=MESH_DIMS, backend_override=override)
    for view, parts in FLATTENED_VIEWS.items():
        mesh[parts]._flatten(view)
    _MESHES[key] = (world, mesh)
    return mesh


def _check_nccl_caps(caps: dict[str, int] | None) -> tuple[tuple[str, int], ...]:
    """``build_mesh``'s nccl_max_ctas, checked (before any group exists), as a sorted tuple."""
    if not caps:
        return ()
    if not isinstance(caps, dict):
        raise TypeError(f"nccl_max_ctas must be a dict of mesh dim -> int, got {type(caps).__name__}")
    for name, n in caps.items():
        if name not in MESH_DIMS:
            raise ValueError(f"nccl_max_ctas: {name!r} is not a mesh dim; choose among {MESH_DIMS}")
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 64:
            raise ValueError(f"nccl_max_ctas[{name!r}]={n!r} must be an int in 1..64")
    return tuple(sorted(caps.items()))


def mesh_device(mesh: DeviceMesh) -> torch.device:
    """This rank's device for the mesh (``cuda:<current>`` on a CUDA mesh)."""
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def submesh(mesh: DeviceMesh, *names: str) -> DeviceMesh:
    """Slice ``mesh`` by dim names, flattened views (``dp_shard_cp`` ...) included.

    torch warns that slicing a flattened dim from the root mesh will be deprecated; it is
    still the only way, in both torch 2.11 and 2.13, to get a 2-D (dp_replicate,
    dp_shard_cp) mesh that shares its root with the TP mesh, which FSDP2 needs.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Slicing a flattened dim")
        return mesh[names if len(names) > 1 else names[0]]
