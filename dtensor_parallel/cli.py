"""Command line: ``dtensor-parallel <command> RECIPE [options] [Megatron flags ...]``.

Commands live in one table (:data:`COMMANDS`): each names a help line, a function that
adds its own arguments, and a function that runs it with the parsed arguments and the
leftover Megatron-style flags (``--train-iters 50 --lr 1e-3 ...``, see
:mod:`dtensor_parallel.trainer.megatron_args`). ``plan``, ``schedule`` and ``suggest`` plug in
by adding a row.

``train`` outside torchrun with ``--nproc-per-node N`` re-launches itself through
``torch.distributed.run --standalone --nproc-per-node N -m dtensor_parallel train ...`` (a free rendezvous
port on this host; gloo on CPU); without it, it runs as a world of one. Before it launches,
the preflight (:mod:`dtensor_parallel.trainer.preflight`) checks the recipe, the model, the
data and the optimizer: exit 2 with one line a problem. Each rank dies with its launcher
and its process group times out after ``--distributed-timeout-minutes``
(:mod:`dtensor_parallel.trainer.launch`).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str]], int]
    takes_megatron_flags: bool = True


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


# ---- train ------------------------------------------------------------------------------
def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="TOML recipe, e.g. recipes/debug.toml")
    p.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", type=int, default=None,
                   help="launch this many local ranks through torch.distributed.run (ignored under torchrun)")


def torchrun_args(nproc: int, recipe: str, flags: list[str]) -> list[str]:
    """``torch.distributed.run`` arguments: ``--standalone --nproc-per-node N -m
    dtensor_parallel train RECIPE FLAGS...`` (standalone: a free port on this host)."""
    return ["--standalone", "--nproc-per-node", str(nproc), "-m", "dtensor_parallel", "train", recipe, *flags]


def relaunch(nproc: int, recipe: str, flags: list[str]) -> int:
    """Run torchrun's launcher in this process (torch is already imported here, which saves
    a second interpreter start); it spawns the ranks and waits for them. The ranks learn its
    pid (they die with it); a stopped rank is continued once another exits, to take torchrun's SIGTERM."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    from .trainer.launch import LAUNCHER_PID_ENV, continue_stopped_ranks

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # N ranks share the cores
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    continue_stopped_ranks()  # a SIGSTOPped rank ends with the job, not 30 s after it
    try:
        torchrun_main(torchrun_args(nproc, recipe, flags))
    except ChildFailedError as e:
        print(f"dtensor-parallel train: a rank failed:\n{e}", file=sys.stderr)
        return 1
    return 0


def _run_train(args: argparse.Namespace, flags: list[str]) -> int:
    from .trainer import load_config, train
    from .trainer.launch import CollectiveTimeout, exit_with_parent
    from .trainer.preflight import preflight_errors

    if under_torchrun():
        exit_with_parent()  # first thing: a rank whose launcher dies dies with it (no orphans)
    launch = args.nproc_per_node is not None and not under_torchrun()
    try:  # config errors: one clear line (before spawning ranks) instead of a traceback per rank
        cfg = load_config(args.recipe, flags)
        if launch and args.nproc_per_node < 1:
            raise ValueError(f"--nproc-per-node must be >= 1, got {args.nproc_per_node}")
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"dtensor-parallel train: error: {e}", file=sys.stderr)
        return 2
    world = args.nproc_per_node if launch else int(os.environ.get("WORLD_SIZE", "1"))
    errors = preflight_errors(cfg, world, nproc_per_node=args.nproc_per_node if launch else None)
    if errors:  # the model, the layout, the data and the optimizer: one line each
        for e in errors:
            print(f"dtensor-parallel train: error: {e}", file=sys.stderr)
        return 2
    if launch:
        return relaunch(args.nproc_per_node, args.recipe, flags)
    from .checkpoint.atomic import CorruptCheckpointError
    from .trainer.nonfinite import NonFiniteError
    from .trainer.storage import DiskFullError

    try:
        train(cfg)
    except CollectiveTimeout as e:  # names the ranks that did not arrive
        print(f"dtensor-parallel train: error: {e}", file=sys.stderr, flush=True)
        return 1
    except (CorruptCheckpointError, NonFiniteError, DiskFullError) as e:  # the same on every rank: one line
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"dtensor-parallel train: error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


# ---- tokens -----------------------------------------------------------------------------
def _tokens_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a flat file of token ids (uint16 or uint32, native byte order)")
    p.add_argument("--dtype", choices=("uint16", "uint32"), default=None,
                   help="what the file holds: scan every id and write the statement PATH.json "
                        "(without it: say what the file states, or what it could be)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="check every id is below it (the first one that is not is named with its position)")


def _run_tokens(args: argparse.Namespace, flags: list[str]) -> int:
    from pathlib import Path

    from .trainer.data import TOKEN_DTYPES, read_statement, statement_path, why_not, write_statement

    path = Path(args.path)
    try:
        if args.dtype is not None:
            meta = write_statement(path, args.dtype, args.vocab_size)
            print(f"wrote {statement_path(path)}: {meta['dtype']}, {meta['n_tokens']} tokens, max id {meta['max_id']}")
            return 0
        if not path.is_file():
            raise FileNotFoundError(f"token file {str(path)!r} does not exist")
        meta = read_statement(path)
        if meta is not None:
            print(f"{path} states: {meta['dtype']}, {meta.get('n_tokens')} tokens, max id {meta.get('max_id')} "
                  f"({statement_path(path)})")
            return 0
        print(f"{path} states no dtype (no {statement_path(path).name}); read as")
        for d in TOKEN_DTYPES:
            why = why_not(path, d, args.vocab_size or 2 ** 32)
            print(f"  {d}: {why or 'valid ids' + (f' below {args.vocab_size}' if args.vocab_size else '')}")
        print(f"state it with: dtensor-parallel tokens {path} --dtype uint16|uint32")
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"dtensor-parallel tokens: error: {e}", file=sys.stderr)
        return 2


# ---- schedule ---------------------------------------------------------------------------
def _schedule_arguments(p: argparse.ArgumentParser) -> None:
    from .pipeline.schedules import SCHEDULES

    p.add_argument("--pp", type=int, default=4, help="pipeline ranks (default 4)")
    p.add_argument("--vpp", type=int, default=None,
                   help="stages per rank (default: the schedule's minimum, 1; 2 for interleaved_1f1b/zbv)")
    p.add_argument("--microbatches", type=int, default=8, help="micro-batches per step (default 8)")
    p.add_argument("--schedule", choices=list(SCHEDULES), default=None,
                   help="default: interleaved_1f1b if --vpp > 1 else 1f1b")
    p.add_argument("--out", default=None, help="PNG path (default schedule_<name>_pp<P>_v<V>_m<M>.png)")


def _run_schedule(args: argparse.Namespace, flags: list[str]) -> int:
    from .planning.draw import render_schedule
    from .pipeline.schedules import default_virtual

    name = args.schedule or ("interleaved_1f1b" if (args.vpp or 1) > 1 else "1f1b")
    vpp = args.vpp if args.vpp is not None else default_virtual(name)
    try:
        print(render_schedule(name, args.pp, vpp, args.microbatches, args.out))
    except ValueError as e:
        print(f"dtensor-parallel schedule: error: {e}", file=sys.stderr)
        return 2
    return 0


# ---- plan -------------------------------------------------------------------------------
def _plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="TOML recipe, e.g. recipes/llama3_70b.toml")
    p.add_argument("--gpu-memory", default=None,
                   help="memory of one GPU, e.g. 80GiB (default: the recipe's [cluster] gpu_memory, else 80GiB)")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks to simulate (default: the recipe's [cluster] nodes x nproc_per_node)")
    p.add_argument("--headroom", type=float, default=0.10,
                   help="fraction of GPU memory kept for the CUDA context, NCCL and fragmentation (default 0.10)")
    p.add_argument("--out", default=None, help="PNG path (default plan_<recipe>.png)")


def _run_plan(args: argparse.Namespace, flags: list[str]) -> int:
    from .planning.dry_run import run_plan

    code, report = run_plan(args.recipe, flags, gpu_memory=args.gpu_memory, world_size=args.world_size,
                            out=args.out, headroom=args.headroom)
    print(report, file=sys.stderr if code == 2 else sys.stdout)
    return code


# ---- suggest ----------------------------------------------------------------------------
def _suggest_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", required=True, help="total parameters, e.g. 70B, 350M")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in all")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--interconnect", choices=("nvlink", "ib", "ethernet"), default="ib",
                   help="network between nodes (default ib)")
    p.add_argument("--seq", type=int, default=8192, help="sequence length (default 8192)")
    p.add_argument("--experts", type=int, default=None, help="routed experts of an MoE model")
    p.add_argument("--active-params", default=None, help="parameters one token uses (MoE), e.g. 13B")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU (default 80GiB)")
    p.add_argument("--global-batch-tokens", default="4M",
                   help="tokens per optimizer step (default 4M), for the micro-batch count")


def _run_suggest(args: argparse.Namespace, flags: list[str]) -> int:
    from .planning.planner import suggest

    try:
        result = suggest(params=args.params, gpus=args.gpus, gpus_per_node=args.gpus_per_node,
                         interconnect=args.interconnect, seq=args.seq, experts=args.experts,
                         active_params=args.active_params, gpu_memory=args.gpu_memory,
                         global_batch_tokens=args.global_batch_tokens)
    except ValueError as e:
        print(f"dtensor-parallel suggest: error: {e}", file=sys.stderr)
        return 2
    print(result.report())
    return 0 if result.fits else 1


# ---- export-hf ----------------------------------------------------------------------------
def _export_hf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a training checkpoint (step_N directory, or a root: its newest complete one)")
    p.add_argument("out", help="the Hugging Face folder to write (must not exist)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="dtype of the written tensors (default bf16)")
    p.add_argument("--max-shard-size", default="5GiB", help="largest safetensors file (default 5GiB)")


def _run_export_hf(args: argparse.Namespace, flags: list[str]) -> int:
    from .checkpoint.hf_from_checkpoint import export_checkpoint_to_hf
    from .planning.memory import parse_bytes

    try:
        out = export_checkpoint_to_hf(args.checkpoint, args.out, dtype=args.dtype,
                                      max_shard_bytes=parse_bytes(args.max_shard_size))
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError) as e:
        print(f"dtensor-parallel export-hf: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


COMMANDS: dict[str, Command] = {
    "train": Command("train a model from a TOML recipe (Megatron flags override it)",
                     _train_arguments, _run_train),
    "schedule": Command("draw a pipeline schedule as a PNG and print its bubble fraction (no GPU needed)",
                        _schedule_arguments, _run_schedule, takes_megatron_flags=False),
    "plan": Command("check a recipe on a simulated cluster of its full size (meta model, fake process "
                    "group, no GPU): mesh, per-rank shards and memory, PNG chart; exits 1 if it does not fit",
                    _plan_arguments, _run_plan),
    "export-hf": Command("write a training checkpoint of any layout as a Hugging Face Llama folder (config, "
                         "sharded safetensors, index), one tensor at a time, in one process",
                         _export_hf_arguments, _run_export_hf, takes_megatron_flags=False),
    "tokens": Command("state a token file's dtype: scan its ids and write PATH.json beside it (the trainer "
                      "refuses a file whose dtype is ambiguous and unstated)",
                      _tokens_arguments, _run_tokens, takes_megatron_flags=False),
    "suggest": Command("recommend degrees (TP, PP, CP, EP, DP, SP, schedule) for a model size and cluster, "
                       "following the decision guide, checked by the memory estimator",
                       _suggest_arguments, _run_suggest, takes_megatron_flags=False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dtensor-parallel", allow_abbrev=False,
        description="Megatron-Core parallelism as DTensor placements over one DeviceMesh.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        epilog = ("Any other --flag is a Megatron-Core flag laid over the recipe (see "
                  "dtensor_parallel.trainer.megatron_args)") if cmd.takes_megatron_flags else None
        p = sub.add_parser(name, help=cmd.help, description=cmd.help, epilog=epilog, allow_abbrev=False)
        cmd.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    cmd = COMMANDS[args.command]
    if rest and not cmd.takes_megatron_flags:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return cmd.run(args, rest)
