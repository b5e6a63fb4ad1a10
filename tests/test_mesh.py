"""One N-D mesh: dim order, degrees resolution, flattened views, arithmetic errors."""

from __future__ import annotations

import pytest
from torch.distributed.tensor.debug import CommDebugMode

from dtensor_parallel import MESH_DIMS, ParallelDims, build_mesh
from dtensor_parallel.mesh import submesh

from .local_ranks import fake_world


def test_dims_order_and_views() -> None:
    fake_world(32)
    mesh = build_mesh(pp=2, dp_replicate=2, dp_shard=-1, cp=2, tp=2)
    assert mesh.mesh_dim_names == MESH_DIMS
    assert tuple(mesh.shape) == (2, 2, 2, 2, 2)
    assert submesh(mesh, "dp").size() == 4
    assert submesh(mesh, "dp_shard_cp").size() == 4
    assert submesh(mesh, "dp_cp").size() == 8
    assert tuple(submesh(mesh, "dp_replicate", "dp_shard_cp").shape) == (2, 4)
    # tp innermost: rank 0's tp group is {0, 1}; pp outermost: its pp group is {0, 16}
    assert mesh.mesh[0, 0, 0, 0].tolist() == [0, 1]
    assert mesh.mesh[:, 0, 0, 0, 0].tolist() == [0, 16]


def test_rest_of_world_and_ddp_rest() -> None:
    assert ParallelDims(tp=4, world_size=64).dp_shard == 16
    dims = ParallelDims(dp_replicate=-1, dp_shard=1, tp=8, pp=2, world_size=64)
    assert (dims.dp_replicate, dims.dp, dims.dp_cp) == (4, 4, 4)


def test_product_error_prints_the_arithmetic_before_any_collective() -> None:
    fake_world(32)
    with CommDebugMode() as comm, pytest.raises(
            ValueError, match=r"pp\(1\) \* dp_replicate\(2\) \* dp_shard\(4\) \* cp\(1\) \* tp\(8\) = 64 != world size 32"):
        build_mesh(dp_replicate=2, dp_shard=4, tp=8)
    assert comm.get_total_counts() == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"tp": 3}, r"tp\(3\) = 3 does not divide world size 8"),
    ({"tp": 0}, "tp must be >= 1"),
    ({"dp_shard": -1, "dp_replicate": -1}, "both -1"),
    ({"tp": True}, "must be an int"),
])
def test_bad_degrees(kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        ParallelDims(**kwargs, world_size=8)


@pytest.mark.parametrize("caps,match", [
    ({"pp": 2}, "caps NCCL communicators, but this mesh is 'cpu'"),
    ({"pipe": 2}, "'pipe' is not a mesh dim"),
    ({"pp": 0}, r"nccl_max_ctas\['pp'\]=0 must be an int in 1..64"),
    ({"pp": True}, "must be an int"),
])
def test_nccl_caps_are_checked_before_any_group(caps: dict, match: str) -> None:
    """build_mesh(nccl_max_ctas=...) (the pp communicator's P2P kernels held to a few SMs):
    a CUDA (NCCL) mesh only, mesh dims only, 1..64; every error before any group exists."""
    fake_world(2)
    with CommDebugMode() as comm, pytest.raises(ValueError, match=match):
        build_mesh(pp=2, nccl_max_ctas=caps)
    assert comm.get_total_counts() == 0
