"""Training configuration: a TOML recipe, Megatron-style flags laid over it, validated.

    cfg = load_config("recipes/debug.toml", ["--train-iters", "50", "--lr", "1e-3"])

Order of precedence: dataclass defaults < recipe < command-line flags. The flags are parsed
by :func:`dtensor_parallel.trainer.megatron_args.parse_megatron_args` into a nested overlay dict and
merged with :func:`~dtensor_parallel.trainer.megatron_args.deep_merge`. Every key is checked: an
unknown section or key is a ``ValueError`` that names both (and the closest known key), so
a typo in a recipe never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import math
import sys
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any

from ..mesh import ParallelDims
from ..models.llama import ModelArgs, llama3_args
from ..models.moe import MoEArgs
from ..plan import ParallelPlan
from .data import TOKEN_DTYPES as _TOKEN_FILE_DTYPES
from .launch import DEFAULT_TIMEOUT_MINUTES
from .megatron_args import deep_merge, parse_megatron_args
from .preflight import check_model_args

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, declared in pyproject for these versions only
    import tomli as tomllib

LR_DECAY_STYLES = ("cosine", "linear", "constant")
DEVICES = ("auto", "cpu", "cuda")
TOKEN_DTYPES = tuple(_TOKEN_FILE_DTYPES)
MODEL_NAMES = ("llama3",)


@dataclass
class ClusterConfig:
    """What the recipe targets (documentation plus the default launch size).

    ``nodes x nproc_per_node`` is the world size ``dtensor-parallel plan`` simulates;
    ``gpu_memory`` (e.g. ``"80GiB"``) the memory it checks each rank against;
    ``interconnect`` between nodes: ``"nvlink"``, ``"ib"`` or ``"ethernet"``.
    ``device`` where the ranks run: ``"cuda"`` (one GPU a rank, NCCL), ``"cpu"`` (gloo, even
    on a machine with GPUs: the debug recipes), or ``"auto"`` (cuda when a GPU is visible).
    ``distributed_timeout_minutes``: the process group's timeout (gloo and NCCL): a collective
    some rank does not join fails after it, naming that rank (``trainer/launch.py``).
    """

    description: str = ""
    nproc_per_node: int | None = None
    device: str = "auto"
    gpu: str | None = None
    nodes: int = 1
    gpu_memory: str | None = None
    interconnect: str | None = None
    distributed_timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES


@dataclass
class ModelConfig:
    """A registered flavour plus ``ModelArgs`` overrides (``dim``, ``n_layers`` ...)."""

    name: str = "llama3"
    flavour: str = "debug"
    overrides: dict[str, Any] = field(default_factory=dict)

    def args(self) -> ModelArgs:
        overrides = dict(self.overrides)
        moe = overrides.pop("moe", None)  # [model.moe]: fields of MoEArgs over the flavour's
        args = llama3_args(self.flavour, **overrides)
        if moe:
            if args.moe is None:
                raise ValueError(f"[model.moe] is set but flavour {self.flavour!r} has no MoE layers: "
                                 "choose debug-moe, mixtral-8x7b or deepseek-v3-shaped")
            args = replace(args, moe=replace(args.moe, **moe))
        return args


def _degrees_table() -> type:
    """``[parallel]``: the fields of :class:`ParallelDims` (less ``world_size``, which is the
    launch's) plus ``ep``, made from ParallelDims itself so the two never drift apart."""
    spec = [(f.name, f.type, field(default=f.default)) for f in fields(ParallelDims) if f.name != "world_size"]

    def dims(self, world_size: int) -> ParallelDims:
        """The validated degrees for a world of ``world_size`` ranks (``dp_shard=-1``: the rest)."""
        return ParallelDims(**{k: v for k, v in asdict(self).items() if k != "ep"}, world_size=world_size)

    return make_dataclass("ParallelConfig", [*spec, ("ep", int, field(default=1))], namespace={"dims": dims})


ParallelConfig = _degrees_table()

#: ParallelPlan fields the recipe sets elsewhere ([training] batch sizes, [parallel] ep) or
#: that belong to a user's own model (the trainer builds the built-in Llama)
PLAN_FIELDS_SET_ELSEWHERE = {"micro_batch_size": "[training] micro_batch_size",
                             "global_batch_size": "[training] global_batch_size",
                             "expert_parallel": "[parallel] ep", "blocks": None, "rules": None,
                             "num_heads": None, "num_kv_heads": None}


@dataclass
class TrainingConfig:
    """Batch, length, steps, optimizer and LR schedule.

    ``global_batch_size`` is sequences per optimizer step over all data-parallel ranks
    (``None``: ``micro_batch_size * dp``, no accumulation). ``max_nonfinite_steps``: a step
    whose loss or gradient norm is not finite is skipped (never applied); this many in a
    row are tolerated, one more stops the run (0: stop at the first; trainer/nonfinite.py).
    ``gc_interval``: Python's automatic garbage collection is off and every rank collects at
    the start of every ``gc_interval``-th step, so no rank stalls the others at a moment of its
    own (TorchTitan's ``gc_freq``, Megatron's ``--manual-gc``); 0: Python's automatic collection.
    ``optimizer_state_dtype``: AdamW's moments, "fp32" (torch's AdamW) or "bf16" (ours,
    stochastically rounded: 12 bytes a parameter of training state instead of 16;
    ``dtensor_parallel/adamw.py``; Megatron's ``--exp-avg-dtype``/``--exp-avg-sq-dtype bf16``).
    """

    micro_batch_size: int = 1
    global_batch_size: int | None = None
    seq_len: int = 2048
    steps: int = 100
    lr: float = 3e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    optimizer_state_dtype: str = "fp32"
    grad_clip: float = 1.0
    seed: int = 0
    max_nonfinite_steps: int = 3
    gc_interval: int = 50


@dataclass
class DataConfig:
    """``path`` to a flat token file, or synthetic Markov data when ``mock`` or no path.
    ``dtype``: None reads the dtype the file states (``PATH.json``, see ``trainer/data.py``);
    set, the file's statement must agree. ``reset_attention_mask``: packed documents, with
    boundaries after ``eod_token_id`` or at the offsets of ``document_starts``
    (``trainer/documents.py``)."""

    path: str | None = None
    dtype: str | None = None
    mock: bool = False
    # packed documents (trainer/documents.py): attention masked at document boundaries, which
    # come from an end-of-document token or an explicit file of document start offsets
    reset_attention_mask: bool = False
    eod_token_id: int | None = None
    document_starts: str | None = None

    @property
    def synthetic(self) -> bool:
        return self.mock or self.path is None


@dataclass
class LoggingConfig:
    log_interval: int = 1
    metrics_path: str | None = None  # default runs/<recipe stem>/metrics.jsonl
    profile: bool = False
    profile_ranks: list[int] = field(default_factory=lambda: [0])


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (``dtensor_parallel.checkpoint``): ``save`` is the root
    directory of ``step_N`` checkpoints, written every ``save_interval`` steps and after
    the last step; ``load`` a checkpoint (or a root: its newest) to start from;
    ``resume = "auto"`` continues from the newest complete checkpoint under ``save``
    (else ``load``), or starts afresh when there is none. ``async_save`` writes in a
    background thread and publishes at the next save or the end of the run.
    ``init_from_hf``: a Hugging Face Llama folder the weights start from (each rank reads its
    slices) when no checkpoint is resumed."""

    save: str | None = None
    load: str | None = None
    init_from_hf: str | None = None
    save_interval: int | None = None
    resume: str = "none"  # "auto" | "none"
    async_save: bool = False


@dataclass
class TrainConfig:
    name: str = "run"
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # type: ignore[valid-type]
    plan: ParallelPlan = field(default_factory=ParallelPlan)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.metrics_path).parent  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def parallel_plan(self, global_batch_size: int | None = None) -> ParallelPlan:
        """The [plan] table's ParallelPlan with the batch sizes and ep of the other tables."""
        t = self.training
        return replace(self.plan, micro_batch_size=t.micro_batch_size,
                       global_batch_size=global_batch_size or t.global_batch_size,
                       expert_parallel=self.parallel.ep)


SECTIONS: dict[str, type] = {"cluster": ClusterConfig, "model": ModelConfig, "parallel": ParallelConfig,
            "plan": ParallelPlan, "training": TrainingConfig, "data": DataConfig,
            "logging": LoggingConfig, "checkpoint": CheckpointConfig}


# ---- loading --------------------------------------------------------------------------
def load_config(recipe: str | Path, flags: list[str] | None = None,
                overlay: dict[str, Any] | None = None) -> TrainConfig:
    """Read ``recipe``, lay the parsed Megatron ``flags`` (and/or an ``overlay`` dict) on
    it, validate, and return the config tree."""
    path = Path(recipe)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist: pass the path of a TOML "
                                f"recipe, e.g. recipes/debug.toml")
    with path.open("rb") as f:
        raw = tomllib.load(f)
    for layer in (parse_megatron_args(list(flags)) if flags else None, overlay):
        if not layer:
            continue
        data = layer.get("data", {})
        if "path" in data and "mock" not in data:  # --data-path over a mock recipe: use the file
            layer = deep_merge(layer, {"data": {"mock": False}})
        raw = deep_merge(raw, layer)
    return config_from_dict(raw, name=path.stem)


def config_from_dict(raw: dict[str, Any], name: str = "run") -> TrainConfig:
    """Build and validate a :class:`TrainConfig` from a nested dict (recipe + overlay)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for section, value in raw.items():
        if section not in SECTIONS:
            raise ValueError(f"unknown section [{section}]{_did_you_mean(section, SECTIONS)}; "
                             f"known sections: {', '.join(SECTIONS)}")
        if not isinstance(value, dict):
            raise ValueError(f"[{section}] must be a table of keys, got {value!r}")
    # [training] log_interval is an alias of [logging] log_interval (which wins: flags go there)
    training = raw.setdefault("training", {})
    if "log_interval" in training:
        raw.setdefault("logging", {}).setdefault("log_interval", training.pop("log_interval"))
    model = _model_section(raw.pop("model", {}))
    built = {s: _build_section(s, SECTIONS[s], raw.get(s, {})) for s in SECTIONS if s != "model"}
    cfg = TrainConfig(name=name, model=model, **built)
    if cfg.logging.metrics_path is None:
        cfg.logging.metrics_path = str(Path("runs") / name / "metrics.jsonl")
    validate(cfg)
    return cfg


def _model_section(raw: dict[str, Any]) -> ModelConfig:
    raw = dict(raw)
    name = _coerce("model", "name", raw.pop("name", "llama3"), str)
    if name not in MODEL_NAMES:
        raise ValueError(f"[model] name={name!r}: choose one of {MODEL_NAMES}")
    flavour = _coerce("model", "flavour", raw.pop("flavour", "debug"), str)
    ffn_hidden = _coerce("model", "ffn_hidden_dim", raw.pop("ffn_hidden_dim", None), int | None)
    hints = typing.get_type_hints(ModelArgs)
    if "moe" in raw:
        raw["moe"] = _moe_table(raw["moe"])
    for key, value in raw.items():
        if key == "moe":
            continue
        if key not in hints:
            raise ValueError(f"unknown key {key!r} in section [model]{_did_you_mean(key, hints)}; "
                             f"known keys: name, flavour, ffn_hidden_dim, {', '.join(hints)}")
        raw[key] = _coerce("model", key, value, hints[key])
    if ffn_hidden is not None:  # (Megatron's --ffn-hidden-size): the dense SwiGLU width as given
        if ffn_hidden < 1:
            raise ValueError(f"[model] ffn_hidden_dim={ffn_hidden} must be a positive int")
        raw["ffn_hidden"] = int(ffn_hidden)  # over any flavour's own, e.g. Mixtral's 14336
    cfg = ModelConfig(name=name, flavour=flavour, overrides=raw)
    cfg.args()  # the flavour and every override, checked now
    return cfg


def _moe_table(raw: Any) -> dict[str, Any]:
    """[model.moe]: MoEArgs fields, type-checked (values are checked by MoEArgs itself)."""
    if not isinstance(raw, dict):
        raise ValueError(f"[model] moe must be a table of MoE settings, got {raw!r}")
    hints = typing.get_type_hints(MoEArgs)
    out = {}
    for key, value in raw.items():
        if key not in hints:
            raise ValueError(f"unknown key {key!r} in section [model.moe]{_did_you_mean(key, hints)}; "
                             f"known keys: {', '.join(hints)}")
        out[key] = _coerce("model.moe", key, value, hints[key])
    return out


def _build_section(section: str, cls: type, raw: dict[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    if cls is ParallelPlan:
        known = {k: f for k, f in known.items() if k not in PLAN_FIELDS_SET_ELSEWHERE}
        for key in raw:
            if key in PLAN_FIELDS_SET_ELSEWHERE:
                where = PLAN_FIELDS_SET_ELSEWHERE[key]
                raise ValueError(f"[plan] {key} is not a recipe key here: "
                                 + (f"set {where}" if where else "the trainer builds the built-in Llama, "
                                    "whose plan the library knows"))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise ValueError(f"unknown key {key!r} in section [{section}]{_did_you_mean(key, known)}; "
                             f"known keys: {', '.join(known)}")
        kwargs[key] = _coerce(section, key, value, hints[key])
    return cls(**kwargs)


def _coerce(section: str, key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type hint (ints are accepted for floats)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for opt in options:
        if opt is type(None) and value is None:
            return None
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is str and isinstance(value, str):
            return value
        if (opt is dict or typing.get_origin(opt) is dict) and isinstance(value, dict):
            return value
        if typing.get_origin(opt) is typing.Literal and isinstance(value, str):
            return value  # its own __post_init__ names the choices
        if typing.get_origin(opt) is list:
            items = value if isinstance(value, (list, tuple)) else [value]
            if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
                return list(items)
    raise ValueError(f"[{section}] {key}={value!r} has the wrong type: expected {hint}")


def _did_you_mean(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ---- validation -------------------------------------------------------------------------
def validate(cfg: TrainConfig) -> None:
    """Cross-field checks that need no process group (errors name the fix)."""
    t, d, lg, p = cfg.training, cfg.data, cfg.logging, cfg.parallel
    args = cfg.model.args()
    check_model_args(args)
    for key in ("micro_batch_size", "seq_len", "steps"):
        if getattr(t, key) < 1:
            raise ValueError(f"[training] {key}={getattr(t, key)} must be >= 1")
    if t.global_batch_size is not None and (t.global_batch_size < 1 or t.global_batch_size % t.micro_batch_size):
        raise ValueError(f"[training] global_batch_size={t.global_batch_size} must be a positive multiple "
                         f"of micro_batch_size={t.micro_batch_size}")
    if t.max_nonfinite_steps < 0:
        raise ValueError(f"[training] max_nonfinite_steps={t.max_nonfinite_steps} must be >= 0 (0: stop at the "
                         f"first non-finite step)")
    if t.gc_interval < 0:
        raise ValueError(f"[training] gc_interval={t.gc_interval} must be >= 0 (0: Python's automatic garbage "
                         f"collection)")
    if t.lr_decay_style not in LR_DECAY_STYLES:
        raise ValueError(f"[training] lr_decay_style={t.lr_decay_style!r}: choose one of {LR_DECAY_STYLES}")
    if not 0 <= t.min_lr <= t.lr:
        raise ValueError(f"[training] min_lr={t.min_lr} must be in [0, lr={t.lr}]")
    if not 0 <= t.warmup_steps <= t.steps:
        raise ValueError(f"[training] warmup_steps={t.warmup_steps} must be in [0, steps={t.steps}]: "
                         f"lower warmup_steps (--lr-warmup-iters) or raise steps (--train-iters)")
    if t.seq_len > args.max_seq_len:
        raise ValueError(f"[training] seq_len={t.seq_len} > [model] max_seq_len={args.max_seq_len}: "
                         f"lower seq_len or raise max_seq_len (the RoPE table length)")
    if d.dtype is not None and d.dtype not in TOKEN_DTYPES:
        raise ValueError(f"[data] dtype={d.dtype!r}: choose one of {TOKEN_DTYPES} (or leave it out: the "
                         f"token file states its dtype)")
    if not d.synthetic and d.dtype == "uint16" and args.vocab_size > 2 ** 16:
        raise ValueError(f"[data] dtype='uint16' cannot hold token ids of a vocab of {args.vocab_size}: "
                         f"write the token file as uint32 and set [data] dtype = 'uint32'")
    if d.reset_attention_mask and (d.eod_token_id is None) == (d.document_starts is None):
        raise ValueError("[data] reset_attention_mask (--reset-attention-mask) needs the document boundaries from "
                         "exactly one of eod_token_id (--eod-token-id N) or document_starts (--document-starts PATH)")
    if not d.reset_attention_mask and (d.eod_token_id is not None or d.document_starts is not None):
        raise ValueError("[data] eod_token_id / document_starts give document boundaries, which only "
                         "reset_attention_mask = true (--reset-attention-mask) uses: set it, or drop them")
    if d.eod_token_id is not None and not 0 <= d.eod_token_id < args.vocab_size:
        raise ValueError(f"[data] eod_token_id={d.eod_token_id} is not a token id of the vocabulary "
                         f"[0, {args.vocab_size})")
    if d.document_starts is not None and d.synthetic:
        raise ValueError("[data] document_starts are offsets into a token file, and the data is synthetic: give "
                         "[data] path (--data-path), or mark documents with eod_token_id")
    if cfg.cluster.device not in DEVICES:
        raise ValueError(f"[cluster] device={cfg.cluster.device!r}: choose one of {DEVICES}")
    timeout = cfg.cluster.distributed_timeout_minutes
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"[cluster] distributed_timeout_minutes={timeout} (--distributed-timeout-minutes) must be "
                         f"a positive number of minutes (default {DEFAULT_TIMEOUT_MINUTES:g})")
    if lg.log_interval < 1:
        raise ValueError(f"[logging] log_interval={lg.log_interval} must be >= 1")
    for key in ("pp", "cp", "tp", "ep"):
        if getattr(p, key) < 1:
            raise ValueError(f"[parallel] {key}={getattr(p, key)} must be >= 1")
    ck = cfg.checkpoint
    if ck.resume not in ("auto", "none"):
        raise ValueError(f"[checkpoint] resume={ck.resume!r}: choose 'auto' or 'none'")
    if ck.save_interval is not None and ck.save_interval < 1:
        raise ValueError(f"[checkpoint] save_interval={ck.save_interval} must be >= 1")
    if ck.save_interval is not None and not ck.save:
        raise ValueError("[checkpoint] save_interval (--save-interval) needs a directory to save into: "
                         "set [checkpoint] save (--save DIR)")
    if ck.init_from_hf and ck.load:
        raise ValueError("[checkpoint] init_from_hf (--init-from-hf) and load (--load) both give the starting "
                         "weights: keep one")
    if ck.resume == "auto" and not (ck.save or ck.load):
        raise ValueError("[checkpoint] resume='auto' (--resume auto) looks for checkpoints under save or "
                         "load: set --save DIR (or --load DIR)")
    if cfg.plan.pipeline_p2p == "copy_engine" and p.pp > 1 and (cfg.cluster.nodes > 1 or cfg.cluster.device == "cpu"):
        # pp is the mesh's outermost dim: on several nodes, a pp group spans them
        where = f"[cluster] nodes={cfg.cluster.nodes}" if cfg.cluster.nodes > 1 else "[cluster] device='cpu'"
        raise ValueError(f"[plan] pipeline_p2p='copy_engine' needs the pp ranks on GPUs of one NVLink host, but "
                         f"{where} (pp={p.pp}): set pipeline_p2p = 'auto' (NCCL where the copy engine cannot "
                         f"run) or 'nccl'")
    if cfg.plan.sequence_parallel and p.tp == 1:
        # Megatron's behaviour: SP shards activations over tp, so with tp=1 there is nothing to do
        warnings.warn("[plan] sequence_parallel=true with [parallel] tp=1: disabling sequence "
                      "parallelism (as Megatron does)")
        cfg.plan.sequence_parallel = False
    cfg.parallel_plan()  # ParallelPlan's own checks of the whole plan
