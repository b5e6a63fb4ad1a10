"""End-to-end training throughput: our library against TorchTitan, same machine, same run.

    python3 benchmarks/train_throughput.py --layouts 1gpu,fsdp2,tp2sp,pp2,cp2 --compile off,on
    python3 benchmarks/train_throughput.py --dry            # CPU smoke: tiny model, gloo
    python3 benchmarks/train_throughput.py --layouts tp2sp --fused-loss off,on   # ours both ways
    python3 benchmarks/train_throughput.py --layouts 1gpu --selective-policy save_matmuls,save_alternate_matmuls
    python3 benchmarks/train_throughput.py --layouts 1gpu --moments fp32,bf16   # AdamW's moments, ours both ways
    bash benchmarks/run_throughput.sh 1gpu,fsdp2 --compile off   # one device call

A driver launches one ``torchrun`` per (framework, layout, kernels, compile) config, several
at once on disjoint GPU subsets (``CUDA_VISIBLE_DEVICES``), each under a timeout, all under a
global time budget; every finished config rewrites ``$OUT/train_throughput.json`` (rows and
targets) and appends its log to ``$OUT/train_throughput.log``.

Model: Llama-3-8B-shaped (dim 4096, 32 / 8 kv heads, SwiGLU 14336, vocab 128256, RoPE theta
5e5 with Llama 3.1 scaling) with ``--layers`` layers (default 8: the 32 with AdamW do not fit
one 80 GB GPU), the same depth in every layout. Sequence 8192, one sequence per micro-batch
and data-parallel rank; PP runs ``--microbatches`` micro-batches (default 8) through 1F1B,
split as TorchTitan splits by default (embedding and head count as one layer each). bf16
compute, fp32 master weights and gradient reduction, selective recompute (each library's
own op-level policy), AdamW (fused; lr 8e-4, betas 0.9/0.95, eps 1e-8, wd 0.1), grad-norm
clipping at 1.0, synthetic uniform random tokens (the same for both). Warm-up steps, then
the median of the timed steps (synchronized wall time, optimizer step included).

Layouts are data: ``-``-joined degrees, world size = their product: ``1gpu``, ``fsdpN``,
``tpNsp`` (TorchTitan's TP is always sequence parallel), ``ppN``, ``cpN``, e.g. ``tp2sp-fsdp2``.

MFU = tokens/s/GPU x FLOPs/token / 989e12 (H100 SXM dense bf16). FLOPs/token (training,
forward + backward) = 6 N + 12 L d s: N counts every parameter that does a matmul (all
block weights and the output head, plus the norms; not the input embedding, a lookup), and
12 L d s is the attention scores and weighted sum (2 x 2 s d a token a layer forward, x 3)
**without** halving for the causal mask: TorchTitan's and PaLM's convention
(``get_dense_model_nparams_and_flops``: 12 l h q t). ``mfu_causal`` halves that term.
Recompute is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

PEAK_FLOPS = 989e12
NAME = "train_throughput"
SHAPES = {  # Llama 3 8B's shape; "tiny" for the CPU smoke run
    "8B": dict(dim=4096, n_heads=32, n_kv_heads=8, vocab_size=128256, multiple_of=1024,
               ffn_dim_multiplier=1.3, rope_theta=500000.0),
    "tiny": dict(dim=128, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=64,
                 ffn_dim_multiplier=None, rope_theta=500000.0),
}
_TOKEN = re.compile(r"(fsdp|tp|pp|cp)(\d+)(sp)?")


@dataclass(frozen=True)
class Layout:
    name: str
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sp: bool = False

    @property
    def world_size(self) -> int:
        return self.dp_shard * self.tp * self.pp * self.cp

    @property
    def triton_families(self) -> tuple[str, ...]:
        """Kernel families of ``plan.kernels`` that this layout runs (for the triton variant)."""
        return (("attention",) if self.cp > 1 else ()) + (("sp_reduce_scatter",) if self.sp else ())


def parse_layout(name: str) -> Layout:
    """``"tp2sp-fsdp2"`` -> Layout(dp_shard=2, tp=2, sp=True); ``"1gpu"`` -> one rank."""
    if name == "1gpu":
        return Layout(name)
    degrees: dict[str, int] = {}
    sp = False
    for tok in name.split("-"):
        m = _TOKEN.fullmatch(tok)
        if not m or int(m.group(2)) < 2 or m.group(1) in degrees or (m.group(3) and m.group(1) != "tp"):
            raise ValueError(f"layout {name!r}: {tok!r} is not one of fsdpN, tpNsp, ppN, cpN (N >= 2, each "
                             f"once, joined by '-'), nor '1gpu'")
        if m.group(1) == "tp" and not m.group(3):
            raise ValueError(f"layout {name!r}: TorchTitan's TP is always sequence parallel: write "
                             f"tp{m.group(2)}sp")
        degrees[m.group(1)] = int(m.group(2))
        sp |= bool(m.group(3))
    return Layout(name, dp_shard=degrees.get("fsdp", 1), tp=degrees.get("tp", 1), pp=degrees.get("pp", 1),
                  cp=degrees.get("cp", 1), sp=sp)


def stage_layers(n_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage, TorchTitan's default rule: the embedding and the head
    count as one layer each, the rest split evenly, the first stages taking the remainder."""
    per, extra = divmod(n_layers + 2, pp)
    counts = [per + (s < extra) for s in range(pp)]
    counts[0] -= 1
    counts[-1] -= 1
    if min(counts) < 1:
        raise ValueError(f"{n_layers} layers do not fill {pp} pipeline stages: use more --layers")
    return counts


def model_args(shape: str, n_layers: int, seq: int):
    from dtensor_parallel.models.llama import ModelArgs

    return ModelArgs(**SHAPES[shape], n_layers=n_layers, max_seq_len=seq)


def flops_per_token(args, seq: int) -> dict[str, float]:
    """Training FLOPs per token (module docstring): dense 6 N, attention 12 L d s."""
    n = args.num_params() - args.vocab_size * args.dim  # all but the input embedding
    dense, attn = 6.0 * n, 12.0 * args.n_layers * args.dim * seq
    return {"matmul_params": n, "dense": dense, "attention": attn, "total": dense + attn,
            "total_causal": dense + attn / 2}


@dataclass(frozen=True)
class RunConfig:
    framework: str  # "ours" | "torchtitan" | "hf" (transformers' Llama through our parallelize)
    layout: str
    kernels: str  # "torch" | "triton" | "sdpa" (ours), "-" | "async_tp" (torchtitan)
    compile: bool
    fused_loss: bool = False  # ours: ParallelPlan.fused_loss (the key says so only when on)
    selective_policy: str = "save_matmuls"  # ours: ParallelPlan.selective_policy (key: /alt_mm)
    moments: str = "fp32"  # ours: AdamW's moments, torch's fused AdamW or ours in bf16 (key: /bf16_moments)

    @property
    def key(self) -> str:
        key = f"{self.framework}/{self.layout}/{self.kernels}/{'compile' if self.compile else 'eager'}"
        key = key + "/fused_loss" if self.fused_loss else key
        key = key + "/alt_mm" if self.selective_policy == "save_alternate_matmuls" else key
        return key + "/bf16_moments" if self.moments == "bf16" else key


def configs(layouts: list[str], frameworks: list[str], compiles: list[bool], kernels: list[str],
            fused_losses: tuple[bool, ...] = (False,),
            policies: tuple[str, ...] = ("save_matmuls",), titan_async_tp: bool = False,
            moments: tuple[str, ...] = ("fp32",)) -> list[RunConfig]:
    """Layout-major, so both frameworks of a layout run close together in time;
    ``fused_losses`` and ``policies`` (selective recompute's) multiply our rows only
    (TorchTitan's loss and recompute policy are its own); ``titan_async_tp`` adds TorchTitan
    rows with its async TP on (kernels "async_tp") to compiled TP layouts."""
    out = []
    for c in compiles:
        for name in layouts:
            lay = parse_layout(name)
            for fw in frameworks:
                titan = ["-"] + (["async_tp"] if titan_async_tp and c and lay.tp > 1 else [])
                for k in (kernels if fw in ("ours", "hf") else titan):
                    if k == "triton" and not lay.triton_families:
                        continue
                    if k == "sdpa" and lay.cp == 1:  # (the ring's block kernel: CP layouts only)
                        continue
                    if k == "torch" and lay.cp > 1:  # our "torch" ring blocks are the fp32 reference
                        continue  # (about 20 TFLOP/s in benchmarks/ring_attention.py): not a training path
                    for fused in (fused_losses if fw == "ours" else (False,)):
                        for policy in (policies if fw == "ours" else ("save_matmuls",)):
                            for mom in (moments if fw == "ours" else ("fp32",)):
                                out.append(RunConfig(fw, name, k, c, fused, policy, mom))
    return out


@dataclass
class Running:
    cfg: RunConfig
    proc: subprocess.Popen
    gpus: list[str] | None
    log: Path
    result: Path
    start: float
    deadline: float


def config_slug(cfg: RunConfig) -> str:
    return cfg.key.replace("/", "_").replace("-", "x")


def launch(cfg: RunConfig, gpus: list[str] | None, args, tmp: Path) -> Running:
    lay = parse_layout(cfg.layout)
    result, log = tmp / f"{config_slug(cfg)}.json", tmp / f"{config_slug(cfg)}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(lay.world_size),
           str(Path(__file__).resolve()), "--worker", "--framework", cfg.framework, "--layout", cfg.layout,
           "--kernels", cfg.kernels, "--shape", args.shape, "--layers", str(args.layers), "--seq", str(args.seq),
           "--microbatches", str(args.microbatches), "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--result", str(result)] + (["--compile"] if cfg.compile else []) + (["--profile"] if args.profile else []) \
        + (["--fused-loss"] if cfg.fused_loss else []) + ["--selective-policy", cfg.selective_policy] \
        + ["--moments", cfg.moments]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "benchmarks"),
                                                                     os.environ.get("PYTHONPATH")])))
    env["OUT"] = str(args.out_dir)  # where a profile summary goes
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    elif args.dry:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)  # its own process group: a timeout kills all ranks
    now = time.time()
    return Running(cfg, proc, gpus, log, result, now, now + args.timeout)


def stop(run: Running) -> None:
    """SIGTERM to the run's process group (torchrun and its ranks), SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.proc.wait(15)


def collect(run: Running, status: str | None, log_file: Path) -> dict:
    text = run.log.read_text(errors="replace").splitlines()
    wall = time.time() - run.start
    if status is None and run.result.exists():
        row = json.loads(run.result.read_text())
    else:
        row = {"impl": run.cfg.key, **asdict(run.cfg), "status": status or f"failed (exit {run.proc.returncode})",
               "error": "\n".join(l for l in text if l.strip())[-3000:]}
    row.update(wall_s=round(wall, 1), gpus=run.gpus)
    keep = text if len(text) <= 250 else text[:50] + [f"... ({len(text) - 250} lines) ..."] + text[-200:]
    with open(log_file, "a") as f:
        f.write(f"\n===== {run.cfg.key} | gpus {run.gpus} | {row['status']} | {wall:.0f} s =====\n")
        f.write("\n".join(keep) + "\n")
    return row


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("torchtitan", "tyro", "torchdata", "datasets", "tokenizers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def save(rows: list[dict], args, out_dir: Path) -> Path:
    from common import write_results
    from throughput_targets import targets
    from torchtitan_adapter import NOTES

    lays = sorted({r["layout"] for r in rows})
    margs = model_args(args.shape, args.layers, args.seq)
    return write_results(args.name, rows, targets(rows), out_dir=str(out_dir), packages=versions(),
                         config={k: v for k, v in vars(args).items() if k not in ("merge", "out_dir")},
                         model={"shape": args.shape, **SHAPES[args.shape], "n_layers": args.layers, "seq": args.seq,
                                "params": margs.num_params(), "ffn_hidden": margs.ffn_hidden_dim},
                         flops_per_token=flops_per_token(margs, args.seq), peak_flops_per_gpu=PEAK_FLOPS,
                         layouts={n: {**asdict(parse_layout(n)), "world_size": parse_layout(n).world_size}
                                  for n in lays}, notes=NOTES)


def drive(cfgs: list[RunConfig], args, out_dir: Path) -> list[dict]:
    """Run the configs, several at once on disjoint GPUs, within the time budget."""
    import torch

    end = time.time() + args.budget
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    n_gpus = 0 if args.dry else torch.cuda.device_count()
    ids = visible.split(",") if visible else [str(i) for i in range(n_gpus)]
    free, pending, running, rows = list(range(n_gpus)), list(cfgs), [], []
    log_file = out_dir / f"{args.name}.log"
    log_file.write_text("")
    tmp = Path(tempfile.mkdtemp(prefix="throughput_"))
    while pending or running:
        now = time.time()
        for run in list(running):
            status = None if run.proc.poll() is not None else "timeout" if now > run.deadline else "running"
            if status == "running":
                continue
            if status == "timeout":
                stop(run)
            running.remove(run)
            free += [ids.index(g) for g in run.gpus or []]
            rows.append(collect(run, status, log_file))
            r = rows[-1]
            print(f"[{time.time() - end + args.budget:5.0f} s] {r['impl']:<40} {r['status']:<10} "
                  + (f"{r['median_ms']:9.1f} ms  {r['tokens_per_s_per_gpu']:9.0f} tok/s/GPU  mfu {r['mfu'] or 0:.3f}  "
                     f"peak {r['peak_allocated_gib'] or 0:.1f} GiB  loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}"
                     if r["status"] == "ok" else ""), flush=True)
            save(rows, args, out_dir)
        for cfg in list(pending):
            ws = parse_layout(cfg.layout).world_size
            if end - now < args.min_start or (n_gpus and ws > n_gpus):
                pending.remove(cfg)
                why = "skipped: time budget" if end - now < args.min_start else f"skipped: needs {ws} GPUs"
                rows.append({"impl": cfg.key, **asdict(cfg), "status": why})
                save(rows, args, out_dir)
                continue
            if len(running) >= (args.max_parallel if n_gpus else 1) or (n_gpus and len(free) < ws):
                continue
            gpus = None
            if n_gpus:
                free.sort()
                gpus, free = [ids[i] for i in free[:ws]], free[ws:]
            pending.remove(cfg)
            run = launch(cfg, gpus, args, tmp)
            run.deadline = min(run.deadline, end)
            running.append(run)
        time.sleep(0.5)
    return rows


def driver_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layouts", default="1gpu,fsdp2,tp2sp,pp2,cp2", help="comma-separated, e.g. tp4sp,pp4,fsdp4")
    p.add_argument("--frameworks", default="ours,torchtitan")
    p.add_argument("--compile", help="off, on or off,on (default; --dry: off)")
    p.add_argument("--kernels", help="ours: torch, triton and/or sdpa (CP's block kernel), where a family applies "
                                      "(default torch,triton; --dry: torch)")
    p.add_argument("--fused-loss", default="off", help="ours: ParallelPlan.fused_loss off, on or off,on "
                   "(on: rows keyed .../fused_loss; TorchTitan's rows unchanged)")
    p.add_argument("--selective-policy", default="save_matmuls",
                   help="ours: ParallelPlan.selective_policy, comma-separated (save_alternate_matmuls: rows keyed .../alt_mm)")
    p.add_argument("--moments", default="fp32", help="ours: AdamW's moments, fp32 (torch's fused AdamW) and/or "
                   "bf16 (dtensor_parallel.adamw, rows keyed .../bf16_moments), comma-separated")
    p.add_argument("--titan-async-tp", action="store_true",
                   help="also TorchTitan with its async TP on, compiled TP layouts (rows keyed torchtitan/<layout>/async_tp/compile)")
    p.add_argument("--shape", default="8B", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=8, help="the same depth for every layout")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--microbatches", type=int, default=8, help="per step under PP")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--timeout", type=float, default=300, help="seconds per config")
    p.add_argument("--budget", type=float, default=510, help="seconds for everything")
    p.add_argument("--min-start", type=float, default=60, help="start no config with less time left")
    p.add_argument("--max-parallel", type=int, default=8, help="concurrent configs (GPU subsets)")
    p.add_argument("--only", metavar="REGEX", help="keep the configs whose key (framework/layout/kernels/"
                   "eager|compile) matches")
    p.add_argument("--name", default=NAME, help="results file <name>.json/.log in $OUT")
    p.add_argument("--profile", metavar="LAYOUT", help="profile the matching configs of this layout only")
    p.add_argument("--dry", action="store_true", help="CPU smoke run: tiny model, gloo, 2 steps")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="merge results files, recompute targets")
    args = p.parse_args(argv)
    if args.dry:
        args.shape, args.layers, args.seq, args.warmup, args.steps = "tiny", 2, 64, 1, 2
        args.microbatches = 4
        args.name = args.name if args.name != NAME else f"{NAME}_dry"
    args.compile = args.compile or ("off" if args.dry else "off,on")
    args.kernels = args.kernels or ("torch" if args.dry else "torch,triton")
    bad = set(args.fused_loss.split(",")) - {"off", "on"}
    if bad:
        p.error(f"--fused-loss {args.fused_loss!r}: use off, on or off,on")
    bad = set(args.moments.split(",")) - {"fp32", "bf16"}
    if bad:
        p.error(f"--moments {sorted(bad)}: use fp32 and/or bf16")
    bad = set(args.selective_policy.split(",")) - {"save_matmuls", "save_alternate_matmuls"}
    if bad:
        p.error(f"--selective-policy {sorted(bad)}: use save_matmuls and/or save_alternate_matmuls")
    return args


def main(argv: list[str]) -> None:
    if "--worker" in argv:  # one config, under torchrun (throughput_worker.py)
        from throughput_worker import worker, worker_args
        return worker(worker_args(argv))
    args = driver_args(argv)
    default = Path(tempfile.gettempdir()) / NAME if args.dry else ROOT / "benchmarks" / "results"
    out_dir = Path(os.environ.get("OUT") or default)
    out_dir.mkdir(parents=True, exist_ok=True)
    args.out_dir = out_dir
    if args.merge:
        rows, runs = {}, [json.loads(Path(path).read_text()) for path in args.merge]
        for k in ("shape", "layers", "seq", "microbatches"):  # the model of the runs, not the defaults
            setattr(args, k, runs[0]["config"][k])
        for run in runs:  # a later file's row replaces an earlier one of the same config
            rows.update({r["impl"]: r for r in run["rows"]})
        print(f"wrote {save(list(rows.values()), args, out_dir)}")
        return
    layouts = [args.profile] if args.profile else args.layouts.split(",")
    cfgs = configs(layouts, args.frameworks.split(","), [c == "on" for c in args.compile.split(",")],
                   args.kernels.split(","), tuple(f == "on" for f in args.fused_loss.split(",")),
                   tuple(args.selective_policy.split(",")), args.titan_async_tp, tuple(args.moments.split(",")))
    if args.only:  # e.g. a rerun of some configs after a fix
        cfgs = [c for c in cfgs if re.search(args.only, c.key)]
    if args.dry:  # torch's CP dispatcher has no rule for CPU attention kernels
        cfgs = [c for c in cfgs if c.framework == "ours" or parse_layout(c.layout).cp == 1]
    print(f"{len(cfgs)} configs, budget {args.budget:.0f} s, timeout {args.timeout:.0f} s each: "
          + ", ".join(c.key for c in cfgs), flush=True)
    rows = drive(cfgs, args, out_dir)
    from throughput_targets import targets
    for t in targets(rows):
        print(f"target {t['name']}: {t['value']:.3f} (goal {t['goal']})")
    print(f"wrote {save(rows, args, out_dir)}")


if __name__ == "__main__":
    main(sys.argv[1:])
