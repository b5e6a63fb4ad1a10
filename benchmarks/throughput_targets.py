"""The targets of ``train_throughput.py``'s results: ratios of its rows (no processes).

Our rows may come both ways of ``ParallelPlan.fused_loss`` (``--fused-loss off,on``; the key
of a fused row ends in ``/fused_loss``): each is compared with the same TorchTitan row, and
its target names say ``fused_loss`` where it is on.
"""

from __future__ import annotations


def targets(rows: list[dict]) -> list[dict]:
    """ours / TorchTitan tokens/s per layout (goal 1.0) and peak allocated memory (goal 0.85,
    issue 23), the memory estimator against the measured peak (within 10%), MFU on 1 GPU (goal 0.45), scaling efficiency of pure FSDP and TP layouts
    against 1gpu (goal 0.9), per compile setting."""
    from train_throughput import parse_layout

    ok = {r["impl"]: r for r in rows if r.get("status") == "ok"}
    out = []
    for r in ok.values():
        if r["framework"] == "hf":  # transformers' Llama through parallelize against our Llama
            mine = ok.get(r["impl"].replace("hf/", "ours/", 1))
            if mine is not None:
                label = r["impl"].replace("hf/", "", 1)
                out.append({"name": f"{label}: transformers Llama / our Llama tokens/s",
                            "value": r["tokens_per_s"] / mine["tokens_per_s"], "goal": 0.95, "higher_is_better": True})
                if r["peak_allocated_gib"] and mine["peak_allocated_gib"]:  # (None on the CPU dry run)
                    out.append({"name": f"{label}: transformers Llama / our Llama peak allocated",
                                "value": r["peak_allocated_gib"] / mine["peak_allocated_gib"], "goal": 1.05,
                                "higher_is_better": False})
        if r["framework"] != "ours":
            continue
        mode = "compile" if r["compile"] else "eager"
        fused = "/fused_loss" if r.get("fused_loss") else ""
        alt = r.get("selective_policy") == "save_alternate_matmuls"
        bf16_moments = " bf16_moments" if r.get("moments") == "bf16" else ""
        label = (f"{r['layout']} {mode} kernels={r['kernels']}{' fused_loss' if fused else ''}{' alt_mm' if alt else ''}"
                 f"{bf16_moments}")
        tt = ok.get(f"torchtitan/{r['layout']}/-/{mode}")
        if tt is not None:
            out.append({"name": f"{label}: ours / TorchTitan tokens/s",
                        "value": r["tokens_per_s"] / tt["tokens_per_s"], "goal": 1.0, "higher_is_better": True})
            if r.get("peak_allocated_gib") and tt.get("peak_allocated_gib"):  # (None on the CPU dry run)
                out.append({"name": f"{label}: ours / TorchTitan peak allocated",
                            "value": r["peak_allocated_gib"] / tt["peak_allocated_gib"], "goal": 0.85,
                            "higher_is_better": False})
        tt_async = ok.get(f"torchtitan/{r['layout']}/async_tp/{mode}")
        if tt_async is not None:  # issue 24: TP >= 1.05x TorchTitan's TP with its async TP on
            out.append({"name": f"{label}: ours / TorchTitan (async TP) tokens/s",
                        "value": r["tokens_per_s"] / tt_async["tokens_per_s"], "goal": 1.05, "higher_is_better": True})
        if r.get("predicted_peak_gib") and r.get("peak_allocated_gib"):  # (no peak on the CPU dry run)
            out.append({"name": f"{label}: memory estimate / measured peak allocated",
                        "value": r["predicted_peak_gib"] / r["peak_allocated_gib"], "goal": [0.9, 1.1],
                        "higher_is_better": None})
        if r["layout"] == "1gpu" and r["mfu"] is not None:
            out.append({"name": f"1gpu {mode}{' fused_loss' if fused else ''}{' alt_mm' if alt else ''}: MFU (989 TFLOP/s, attention not halved)",
                        "value": r["mfu"], "goal": 0.45, "higher_is_better": True, "torchtitan": tt and tt["mfu"]})
        lay = parse_layout(r["layout"])
        one = ok.get(f"ours/1gpu/torch/{mode}{fused}{'/alt_mm' if alt else ''}")
        if one is not None and lay.world_size > 1 and lay.world_size in (lay.dp_shard, lay.tp):
            tt_one = ok.get(f"torchtitan/1gpu/-/{mode}")
            out.append({"name": f"{label}: scaling efficiency (tokens/s/GPU over 1gpu's)",
                        "value": r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"], "goal": 0.9,
                        "higher_is_better": True,
                        "torchtitan": (tt["tokens_per_s_per_gpu"] / tt_one["tokens_per_s_per_gpu"]
                                       if tt is not None and tt_one is not None else None)})
    return out
