"""benchmarks/train_throughput.py: the FLOP convention against a hand count, layout parsing,
pipeline splits, the config list and the targets (no processes are launched)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import phase_memory  # noqa: E402
import throughput_targets  # noqa: E402
import train_throughput as tt  # noqa: E402


def test_flops_per_token_hand_count():
    d, kv, f, v, layers, s = 4096, 1024, 14336, 128256, 8, 8192
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d  # wq wo, wk wv, w1 w2 w3, two norms
    n = layers * per_layer + d + v * d  # final norm, output head; no input embedding
    args = tt.model_args("8B", layers, s)
    assert args.ffn_hidden_dim == f
    assert args.num_params() == n + v * d
    got = tt.flops_per_token(args, s)
    assert got["matmul_params"] == n
    assert got["dense"] == 6 * n
    assert got["attention"] == 12 * layers * d * s  # TorchTitan's 12 l h q t: not halved
    assert got["total"] == 6 * n + 12 * layers * d * s
    assert got["total_causal"] == 6 * n + 6 * layers * d * s
    from dtensor_parallel.trainer.metrics import flops_per_token
    assert flops_per_token(args, s) == got["total"]  # one convention in the repo


def test_parse_layout():
    assert tt.parse_layout("1gpu").world_size == 1
    assert tt.parse_layout("fsdp4") == tt.Layout("fsdp4", dp_shard=4)
    assert tt.parse_layout("tp2sp") == tt.Layout("tp2sp", tp=2, sp=True)
    lay = tt.parse_layout("tp2sp-fsdp2-pp2")
    assert (lay.world_size, lay.dp_shard, lay.tp, lay.pp, lay.cp) == (8, 2, 2, 2, 1)
    assert tt.parse_layout("cp2").triton_families == ("attention",)
    assert tt.parse_layout("tp4sp").triton_families == ("sp_reduce_scatter",)
    assert tt.parse_layout("pp4").triton_families == ()
    for bad in ("tp2", "fsdp1", "dp2", "fsdp2-fsdp2", "pp2sp", "2gpu", ""):
        with pytest.raises(ValueError):
            tt.parse_layout(bad)


def test_stage_layers_follow_torchtitans_default_split():
    assert tt.stage_layers(8, 2) == [4, 4]
    assert tt.stage_layers(8, 4) == [2, 3, 2, 1]  # embedding and head weigh one layer each
    assert tt.stage_layers(32, 4) == [8, 9, 8, 7]
    with pytest.raises(ValueError):
        tt.stage_layers(2, 4)


def test_configs_put_triton_only_where_a_kernel_family_applies():
    cfgs = tt.configs(["1gpu", "tp2sp", "cp2"], ["ours", "torchtitan"], [False, True], ["torch", "triton"])
    keys = [c.key for c in cfgs]
    assert "ours/1gpu/triton/eager" not in keys
    assert {"ours/tp2sp/triton/eager", "ours/cp2/triton/compile", "torchtitan/cp2/-/compile"} <= set(keys)
    assert "ours/cp2/torch/eager" not in keys  # the fp32 reference ring is no training path
    assert len(keys) == 2 * (2 + 3 + 2)
    assert keys.index("torchtitan/cp2/-/eager") < keys.index("ours/1gpu/torch/compile")  # eager first


def test_fused_loss_multiplies_our_rows_only():
    cfgs = tt.configs(["tp2sp"], ["ours", "torchtitan"], [True], ["torch"], (False, True))
    assert [c.key for c in cfgs] == ["ours/tp2sp/torch/compile", "ours/tp2sp/torch/compile/fused_loss",
                                     "torchtitan/tp2sp/-/compile"]
    assert tt.configs(["tp2sp"], ["ours"], [True], ["torch"]) == cfgs[:1]  # off by default, key unchanged
    with pytest.raises(SystemExit):
        tt.driver_args(["--fused-loss", "yes"])


def _row(fw, layout, tps_gpu, world, kernels=None, compile=False, mfu=0.4, fused_loss=False, peak=None):
    kernels = kernels or ("torch" if fw == "ours" else "-")
    cfg = tt.RunConfig(fw, layout, kernels, compile, fused_loss)
    return {"impl": cfg.key, "framework": fw, "layout": layout, "kernels": kernels, "compile": compile,
            "fused_loss": fused_loss, "status": "ok", "tokens_per_s": tps_gpu * world, "tokens_per_s_per_gpu": tps_gpu,
            "mfu": mfu, "peak_allocated_gib": peak}


def test_targets():
    rows = [_row("ours", "1gpu", 1000, 1), _row("torchtitan", "1gpu", 800, 1, mfu=0.3),
            _row("ours", "fsdp2", 950, 2), _row("torchtitan", "fsdp2", 1000, 2),
            _row("ours", "tp2sp", 800, 2, "triton"), {"impl": "ours/pp2/torch/eager", "status": "timeout"}]
    got = {t["name"]: t for t in throughput_targets.targets(rows)}
    assert got["1gpu eager kernels=torch: ours / TorchTitan tokens/s"]["value"] == pytest.approx(1.25)
    assert got["fsdp2 eager kernels=torch: ours / TorchTitan tokens/s"]["value"] == pytest.approx(0.95)
    assert got["1gpu eager: MFU (989 TFLOP/s, attention not halved)"]["value"] == pytest.approx(0.4)
    eff = got["fsdp2 eager kernels=torch: scaling efficiency (tokens/s/GPU over 1gpu's)"]
    assert (eff["value"], eff["torchtitan"], eff["goal"]) == (pytest.approx(0.95), pytest.approx(1.25), 0.9)
    assert got["tp2sp eager kernels=triton: scaling efficiency (tokens/s/GPU over 1gpu's)"]["value"] == 0.8
    assert not any("pp2" in name for name in got)  # no TorchTitan row, no scaling target


def test_targets_of_fused_loss_rows_and_peak_memory():
    """Both of our loss variants against the same TorchTitan row, told apart by name; the
    peak memory ratio where both rows have one (goal 0.85, issue 23)."""
    rows = [_row("ours", "tp2sp", 1000, 2, compile=True, peak=30.0),
            _row("ours", "tp2sp", 990, 2, compile=True, fused_loss=True, peak=24.0),
            _row("torchtitan", "tp2sp", 1000, 2, compile=True, peak=25.0)]
    got = {t["name"]: t for t in throughput_targets.targets(rows)}
    assert got["tp2sp compile kernels=torch: ours / TorchTitan tokens/s"]["value"] == pytest.approx(1.0)
    assert got["tp2sp compile kernels=torch fused_loss: ours / TorchTitan tokens/s"]["value"] == pytest.approx(0.99)
    peak = got["tp2sp compile kernels=torch fused_loss: ours / TorchTitan peak allocated"]
    assert (peak["value"], peak["goal"], peak["higher_is_better"]) == (pytest.approx(0.96), 0.85, False)
    assert got["tp2sp compile kernels=torch: ours / TorchTitan peak allocated"]["value"] == pytest.approx(1.2)


def test_phase_marks_come_in_step_order():
    """phase_memory on a CPU step: forward (root forward hook), loss (the output's gradient),
    then the step's own backward and optimizer marks; no bytes off CUDA."""
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x, y, mark=lambda phase: None):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        mark("backward")
        opt.step()
        opt.zero_grad()
        mark("optimizer")

    rows = phase_memory.measure_phases(step, torch.randn(5, 4), torch.randint(0, 3, (5,)), model)
    assert [r["phase"] for r in rows] == ["start", "forward", "loss", "backward", "optimizer"]
    assert not model._forward_hooks  # removed after the step


def test_titan_async_tp_rows_and_their_target():
    """--titan-async-tp adds TorchTitan rows with its async TP on, to compiled TP layouts only;
    ours is compared with them at goal 1.05 (issue 24), beside the plain TorchTitan row."""
    cfgs = tt.configs(["1gpu", "tp2sp"], ["ours", "torchtitan"], [False, True], ["triton"], titan_async_tp=True)
    keys = [c.key for c in cfgs]
    assert "torchtitan/tp2sp/async_tp/compile" in keys and "torchtitan/tp2sp/-/compile" in keys
    assert not any("async_tp" in k and ("eager" in k or "1gpu" in k) for k in keys)
    assert not any("async_tp" in c.key for c in tt.configs(["tp2sp"], ["torchtitan"], [True], ["-"]))
    rows = [_row("ours", "tp2sp", 1100, 2, "triton", compile=True), _row("torchtitan", "tp2sp", 1000, 2, compile=True),
            _row("torchtitan", "tp2sp", 1000, 2, "async_tp", compile=True)]
    got = {t["name"]: t for t in throughput_targets.targets(rows)}
    target = got["tp2sp compile kernels=triton: ours / TorchTitan (async TP) tokens/s"]
    assert (target["value"], target["goal"]) == (pytest.approx(1.1), 1.05)
    assert got["tp2sp compile kernels=triton: ours / TorchTitan tokens/s"]["value"] == pytest.approx(1.1)


def test_kernel_timeline_splits_compute_nccl_and_idle():
    """kernel_timeline.kernel_split on a made-up trace: compute is the union of its kernels
    (overlapping streams count once), GPU-side annotations are not kernels, NCCL time beside
    compute is the intersection, idle the rest of the wall time."""
    import kernel_timeline
    import torch

    cuda = torch.autograd.DeviceType.CUDA

    class E:
        def __init__(self, name, a, b, annotation=False, device=cuda):
            self.name, self.device_type, self.is_user_annotation = name, device, annotation
            self.time_range = type("R", (), {"start": a, "end": b})()

    class Prof:
        def events(self):
            return [E("gemm", 0, 4000), E("add", 3000, 5000), E("ncclDevKernel_SendRecv", 4500, 9000),
                    E("PP:0F1", 0, 10000, annotation=True), E("cpu op", 0, 10000, device=torch.autograd.DeviceType.CPU)]

    got = kernel_timeline.kernel_split(Prof(), steps=1, wall_s=0.010)
    assert got["compute_ms"] == pytest.approx(5.0) and got["nccl_ms"] == pytest.approx(4.5)
    assert got["nccl_overlapping_compute_ms"] == pytest.approx(0.5) and got["idle_ms"] == pytest.approx(5.0)
    assert [name for _, _, name in got["top"]] == ["gemm", "add"]


def test_pipeline_targets():
    """pipeline.py's targets: interleaved and ZBV against 1F1B (goal 1.0), every row's
    efficiency against the ideal step, and the worst rank's measured bubble minus theory
    (goal 0.02) where theory applies (not ZBV, not the deliberately uneven split)."""
    import pipeline

    def row(impl, schedule, ms, overhead, bubbles, theory, split=(5, 3)):
        return {"impl": impl, "schedule": schedule, "median_ms": ms, "overhead_vs_ideal": overhead,
                "bubble_over_compute_per_rank": bubbles, "theory_bubble_over_compute": theory,
                "layers_per_stage": list(split) if split else "even"}

    rows = [{"impl": "single_gpu_no_pipeline"}, row("pp2_1f1b_v1", "1f1b", 460.0, 0.08, [0.15, 0.06], 0.125),
            row("pp2_1f1b_v1_even", "1f1b", 600.0, 0.4, [0.6, 0.1], 0.125, split=None),
            row("pp2_interleaved_1f1b_v2", "interleaved_1f1b", 437.0, 0.03, [0.07, 0.06], 0.0625),
            row("pp2_zbv_v2", "zbv", 506.0, 0.19, [0.05, 0.04], 0.0)]
    got = {t["name"]: t for t in pipeline.targets_from(rows, 2)}
    assert got["pp2_interleaved_1f1b_v2 step / pp2_1f1b_v1 step"]["value"] == pytest.approx(0.95)
    assert got["pp2_zbv_v2 step / pp2_1f1b_v1 step"]["value"] == pytest.approx(1.1)
    assert got["pp2_1f1b_v1: efficiency (ideal step / step)"]["value"] == pytest.approx(1 / 1.08)
    assert got["pp2_1f1b_v1: measured bubble - theory (worst rank)"]["value"] == pytest.approx(0.025)
    assert got["pp2_interleaved_1f1b_v2: measured bubble - theory (worst rank)"]["value"] == pytest.approx(0.0075)
    assert not any("bubble" in n and ("zbv" in n or "even" in n) for n in got)


def test_pipeline_balanced_splits():
    """The head counted as 2.4 layers on its rank, every stage at least one layer: at pp=2 and 8
    layers the splits the H100 and H200 runs used; at pp=4 every rank within one layer of the
    others; too few layers for the stages is an error naming the flag."""
    import pipeline

    assert pipeline.balanced_split(8, 2, 1, "1f1b") == [5, 3]
    assert pipeline.balanced_split(8, 2, 2, "interleaved_1f1b") == [3, 2, 2, 1]
    assert pipeline.balanced_split(8, 2, 2, "zbv") == [2, 3, 2, 1]
    for schedule, v in (("1f1b", 1), ("interleaved_1f1b", 2), ("zbv", 2)):
        split = pipeline.balanced_split(16, 4, v, schedule)
        assert sum(split) == 16 and min(split) >= 1
        load = [0.0] * 4
        for st, n in enumerate(split):
            load[pipeline.stage_rank(st, 4, schedule)] += n
        load[pipeline.stage_rank(len(split) - 1, 4, schedule)] += pipeline.HEAD_LAYERS
        assert max(load) - min(load) <= 1.0 + 1e-9, (schedule, split, load)
    with pytest.raises(ValueError, match="--layers >= 8"):
        pipeline.balanced_split(6, 4, 2, "interleaved_1f1b")


def test_busy_time_is_the_union_of_kernel_intervals():
    """throughput_worker.busy_ms: overlapping kernels (two streams) count once, gaps not at
    all, CPU events and mirrored record_function ranges not at all."""
    from types import SimpleNamespace as NS

    import torch
    import throughput_worker

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(a, b, device=cuda, annotation=False):
        return NS(time_range=NS(start=a, end=b), device_type=device, is_user_annotation=annotation)

    events = [ev(0, 1000), ev(500, 1500), ev(1200, 1300), ev(3000, 4000), ev(0, 9000, cpu),
              ev(0, 9000, annotation=True)]
    prof = NS(events=lambda: events)
    assert throughput_worker.busy_ms(prof, steps=1) == pytest.approx(2.5)  # [0, 1.5] and [3, 4] ms
    assert throughput_worker.busy_ms(prof, steps=2) == pytest.approx(1.25)
