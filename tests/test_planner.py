"""`dtensor-parallel suggest`: the decision guide's cases."""

from __future__ import annotations

import pytest

from dtensor_parallel.cli import main
from dtensor_parallel.planning.planner import suggest


def test_under_1b_is_data_parallel_only() -> None:
    s = suggest(params="500M", gpus=8)
    assert (s.dims.tp, s.dims.pp, s.dims.cp, s.dims.dp) == (1, 1, 1, 8) and s.fits


@pytest.mark.parametrize("gpus", [8, 16])
def test_1_to_10b_on_a_node_or_two_is_tp_and_dp(gpus: int) -> None:
    s = suggest(params="8B", gpus=gpus)
    assert s.dims.tp in (2, 4) and s.dims.pp == 1 and s.dims.dp == gpus // s.dims.tp and s.fits
    assert s.plan.sequence_parallel


def test_70b_on_64_is_tp_pp_dp() -> None:
    s = suggest(params="70B", gpus=64, gpus_per_node=8, interconnect="ib")
    assert s.dims.tp in (4, 8) and s.dims.pp > 1 and s.dims.dp > 1 and s.fits
    assert s.plan.pipeline_schedule == "interleaved_1f1b" and s.plan.sequence_parallel


def test_405b_on_256_long_sequences() -> None:
    s = suggest(params="405B", gpus=256, seq=16384)
    assert (s.dims.tp, s.dims.pp, s.dims.cp, s.dims.dp) == (8, 8, 2, 2) and s.fits


def test_ethernet_keeps_tp_small_and_adds_pp() -> None:
    ib = suggest(params="70B", gpus=64, interconnect="ib")
    eth = suggest(params="70B", gpus=64, interconnect="ethernet")
    assert eth.dims.tp <= 4 and eth.dims.pp > ib.dims.pp and eth.fits


def test_tp_never_crosses_a_node() -> None:
    s = suggest(params="405B", gpus=256, gpus_per_node=4)
    assert s.dims.tp <= 4


def test_moe_gets_expert_parallelism() -> None:
    s = suggest(params="47B", gpus=64, experts=8, active_params="13B")
    assert s.ep == 8 and s.fits
    assert any(r.startswith("EP8") for r in s.reasons)


def test_cli_prints_why(capsys) -> None:
    assert main(["suggest", "--params", "70B", "--gpus", "64", "--gpus-per-node", "8", "--interconnect", "ib",
                 "--seq", "8192"]) == 0
    out = capsys.readouterr().out
    assert "why:" in out and "TP never crosses" not in out and "[parallel]" in out
