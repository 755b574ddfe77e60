"""Typed, strict configuration: nested dataclasses, YAML files, dotted command-line overrides.

Precedence is defaults < YAML file < command line. Every key is checked: an unknown key is an error
that names the nearest valid key, and a value of the wrong type is an error that names the key, the
expected type and the value given. The resolved config is logged at start and stored in every
checkpoint (`to_dict` / `from_dict` round-trip exactly).

Command-line overrides take either form::

    python -m lvface.train --config configs/demo.yaml train.epochs=3 --data.batch_size 64
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration problem, with a message that says what to fix."""


def _choose(where: str, key: str, value: Any, allowed) -> None:
    """Refuse a value outside `allowed` (a registry owned by the module that implements the choice)."""
    if value not in allowed:
        raise ConfigError(f"config key '{where}.{key}' is {value!r}; choose one of {', '.join(allowed)}")


def _require(ok: bool, where: str, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{where}.{key}' {problem}")


# Each section validates itself (`validate(where)`, where = its dotted key); the registries of choices
# are owned by the modules that implement them and imported inside validate: config is the bottom of
# the package and those modules import nothing from it.


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str = "vit_t"
    """Backbone variant: vit_t, vit_s, vit_b, vit_l, vit_h, or vit_demo (tiny, for CPUs)."""
    num_features: int = 512
    """Embedding size produced by the feature head."""
    drop_path_rate: Optional[float] = None
    """Stochastic depth; None keeps the variant's WebFace42M preset."""
    mask_ratio: Optional[float] = None
    """Fraction of tokens masked during training; None keeps the variant's preset."""
    using_checkpoint: Optional[bool] = None
    """Activation checkpointing of every block; None keeps the variant's preset."""
    attn_impl: str = "sdpa"
    """Attention path: sdpa (F.scaled_dot_product_attention) or math (explicit reference)."""
    norm_impl: str = "torch"
    """LayerNorm kernels: torch (nn.LayerNorm) or apex (NVIDIA apex's FusedLayerNorm, where installed)."""

    def validate(self, where: str = "model") -> None:
        from lvface.models.vit import ATTN_IMPLS, NORM_IMPLS

        _choose(where, "attn_impl", self.attn_impl, tuple(ATTN_IMPLS))
        _choose(where, "norm_impl", self.norm_impl, tuple(NORM_IMPLS))


@dataclass
class DataConfig:
    rec: str = ""
    """Training data: a RecordIO file (insightface train.rec next to train.idx, header and identity records
    allowed), a folder holding train.rec, or a folder of `lvface pack` shards (*.rec, each with its .idx)."""
    num_classes: int = 0
    """Number of identities; 0 reads it from the data. A non-zero value must match the data."""
    num_images: int = 0
    """Number of training images; 0 reads it from the data. A non-zero value must match the data."""
    batch_size: int = 128
    """Images per rank per micro-step."""
    loader: str = "auto"
    """Decoding path: dali (GPU 'mixed' JPEG decode on CUDA, a CPU pipeline elsewhere), torch (DataLoader +
    PIL, same order and augmentations), or auto (dali when nvidia-dali is installed, else torch)."""
    num_workers: int = 2
    """DataLoader worker processes per rank for loader=torch (0 decodes in the training process)."""
    dali_threads: int = 4
    """CPU threads of each rank's DALI pipeline (JPEG decode on a CPU pipeline, Huffman decode on GPU)."""
    prefetch: int = 2
    """Batches decoded ahead of the training step (DALI batches in flight; DataLoader prefetch per worker)."""
    flip: bool = True
    """Random horizontal flip (probability 0.5)."""
    crop_p: float = 0.0
    """Probability of a scale/crop jitter: a square crop of side U(crop_min_scale, 1) x 112, resized to 112."""
    crop_min_scale: float = 0.8
    """Smallest crop side, as a fraction of the image side."""
    color_p: float = 0.0
    """Probability of a colour jitter: brightness, contrast and saturation factors U(1 - s, 1 + s)."""
    color_strength: float = 0.3
    """s of the colour jitter, in [0, 1)."""
    grayscale_p: float = 0.0
    """Probability of converting an image to grayscale (kept 3-channel)."""
    blur_p: float = 0.0
    """Probability of a Gaussian blur."""
    blur_sigma: list[float] = field(default_factory=lambda: [0.3, 1.5])
    """[low, high] range of the blur's sigma, in pixels."""
    mask_p: float = 0.0
    """Probability of a synthetic mask occluding the lower face (nose to chin) in a flat colour."""

    def validate(self, where: str = "data") -> None:
        _choose(where, "loader", self.loader, ("auto", "dali", "torch"))
        _require(self.batch_size > 0, where, "batch_size", "must be positive")


@dataclass
class StageConfig:
    """One stage of the loss curriculum; stages are ordered and each ends at `end_epoch`."""

    name: str = "early"
    """Name used in logs and checkpoints."""
    end_epoch: float = 40.0
    """The stage is active for epochs [previous stage's end, end_epoch)."""
    sample_rate: float = 1.0
    """Partial-FC sample rate r: positives plus random negatives up to r * classes; 1.0 = no sampling."""
    centers: str = "learned"
    """Which class centers the margin softmax uses: learned (W), prototypes (EPL P), or both."""
    prototype_weight: float = 0.5
    """With centers=both: loss = (1 - w) * CE(W) + w * CE(P). 0.5 is the mean of the two."""
    center_penalty: float = 0.0
    """Weight of an optional penalty mean ||W_y - P_y||^2 pulling learned centers toward prototypes."""

    def validate(self, where: str | None = None) -> None:
        """`where` is the stage's key (loss.stages[i]); a stage built in code is named by its name."""
        from lvface.heads.curriculum import CENTERS

        where = where or f"loss.stages[name={self.name}]"
        _choose(where, "centers", self.centers, CENTERS)
        _require(0.0 < self.sample_rate <= 1.0, where, "sample_rate", f"is {self.sample_rate}; it must be in (0, 1]")
        _require(0.0 <= self.prototype_weight <= 1.0, where, "prototype_weight",
                 f"is {self.prototype_weight}; it must be in [0, 1]")
        _require(self.center_penalty >= 0.0, where, "center_penalty", f"is {self.center_penalty}; it must be >= 0")


def _default_stages() -> list[StageConfig]:
    # The paper's two-stage curriculum: learnable centers with Partial-FC sampling for 40 epochs,
    # then no sampling and centers stabilised by EPL prototypes for 60 more.
    return [
        StageConfig(name="early", end_epoch=40.0, sample_rate=0.3, centers="learned"),
        StageConfig(name="stable", end_epoch=100.0, sample_rate=1.0, centers="both", prototype_weight=0.5),
    ]


@dataclass
class LossConfig:
    margin: str = "combined"
    """Margin family (lvface.heads.margin.MARGINS); "combined" is insightface's (m1, m2, m3) margin."""
    scale: float = 64.0
    """Logit scale s."""
    m1: float = 1.0
    """Multiplicative angular margin: target logit s * (cos(m1 * theta + m2) - m3)."""
    m2: float = 0.5
    """Additive angular margin (ArcFace 0.5)."""
    m3: float = 0.0
    """Additive cosine margin (CosFace 0.4)."""
    gradient: str = "insightface"
    """Margin gradient: insightface (margin shifts forward values only) or exact (true derivative)."""
    stages: list[StageConfig] = field(default_factory=_default_stages)
    """Curriculum stages in order; the last one's end_epoch should reach train.epochs."""
    prototype_update: str = "adaptive"
    """EPL prototype update: adaptive (similarity-adaptive factor) or momentum (fixed)."""
    prototype_momentum: float = 0.9
    """Fixed momentum a for prototype_update=momentum: P <- normalize(a * P + (1 - a) * mean)."""
    impl: str = "auto"
    """Margin-softmax path: auto (triton on CUDA when triton imports, else chunked), triton (fused kernels,
    deterministic), triton_atomic (fused, one backward pass that adds d embeddings with atomics: one product
    fewer, not bitwise reproducible), chunked (blockwise torch GEMMs; none of these holds the [N, C_local]
    logits) or dense (reference)."""
    chunk_mb: float = 64.0
    """Memory budget of one chunk of the chunked path, in MiB (fractions allowed: tests use a few hundred
    bytes to force many chunks)."""

    head_dtype: str = "auto"
    """Operand dtype of the Triton margin-CE kernels: auto (bf16 on CUDA when the embeddings arrive in bf16,
    i.e. train.precision bf16; fp32 on the CPU and otherwise), fp32, or bf16 (a bf16 copy of the embeddings
    and of W, refreshed once per head step; products accumulate, and W, its gradient and the loss stay, in fp32).
    bf16 needs loss.impl triton, triton_atomic or auto on CUDA."""

    def validate(self, where: str = "loss") -> None:
        from lvface.heads.margin import GRADIENTS, MARGINS
        from lvface.heads.prototypes import PROTOTYPE_UPDATES
        from lvface.heads.sharded_softmax import HEAD_DTYPES
        from lvface.kernels.registry import IMPLS

        _choose(where, "margin", self.margin, tuple(MARGINS))
        _choose(where, "gradient", self.gradient, tuple(GRADIENTS))
        _choose(where, "prototype_update", self.prototype_update, tuple(PROTOTYPE_UPDATES))
        _choose(where, "impl", self.impl, tuple(IMPLS))
        _choose(where, "head_dtype", self.head_dtype, HEAD_DTYPES)
        _require(bool(self.stages), where, "stages", "is empty; give at least one stage")
        previous = 0.0
        for i, stage in enumerate(self.stages):
            stage.validate(f"{where}.stages[{i}]")
            _require(stage.end_epoch > previous, f"{where}.stages[{i}]", "end_epoch",
                     f"is {stage.end_epoch}, not after the previous stage's end {previous}; stages must be in "
                     "increasing order")
            previous = stage.end_epoch


@dataclass
class OptimizerConfig:
    """AdamW, for both the backbone (inside DeepSpeed) and the head (outside it)."""

    lr: float = 1e-3
    """Peak learning rate (after warmup)."""
    weight_decay: float = 0.1
    """Decoupled weight decay; biases, norms, pos_embed and mask_token get none."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    head_lr: Optional[float] = None
    """Learning rate of the class centers; None uses lr."""
    head_weight_decay: Optional[float] = None
    """Weight decay of the class centers; None uses weight_decay."""
    head_sparse_rows: bool = True
    """With Partial-FC sampling, update (and decay) only the centers sampled in the step; false: every row."""
    head_impl: str = "torch"
    """Head AdamW kernels: torch (lvface's blockwise AdamW) or apex (NVIDIA apex's fused multi-tensor
    Adam, where installed; needs head_sparse_rows=false, since it steps every row with one step count)."""

    def validate(self, where: str = "optimizer") -> None:
        from lvface.heads.optim import HEAD_OPTIMIZER_IMPLS

        _choose(where, "head_impl", self.head_impl, tuple(HEAD_OPTIMIZER_IMPLS))
        _require(not (self.head_impl == "apex" and self.head_sparse_rows), where, "head_impl",
                 "is apex, which steps every row of the centers with one step count; set "
                 f"{where}.head_sparse_rows=false with it, or {where}.head_impl=torch")
        _require(len(self.betas) == 2, where, "betas", "must have two numbers")


@dataclass
class ScheduleConfig:
    warmup_epochs: float = 0.0
    """Linear warmup from 0 to the peak learning rate, in epochs (used when warmup_steps is 0)."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer steps; overrides warmup_epochs when > 0."""
    decay: str = "polynomial"
    """Decay after warmup: polynomial, cosine, or constant."""
    power: float = 2.0
    """Power of the polynomial decay (insightface uses 2)."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""

    def validate(self, where: str = "schedule") -> None:
        _choose(where, "decay", self.decay, ("polynomial", "cosine", "constant"))


@dataclass
class TrainConfig:
    epochs: float = 100.0
    """Training length in epochs."""
    max_steps: int = 0
    """Stop after this many optimizer steps of the global batch the run started with (the length is kept
    in samples, so a resume on another world size stops at the same point); 0 derives it from epochs."""
    seed: int = 2048
    """Seed of parameters, data order and augmentation."""
    precision: str = "auto"
    """fp32, bf16, fp16, or auto (the DeepSpeed config's choice; bf16 on a GPU that has it, else fp32)."""
    tf32: bool = True
    """On CUDA, fp32 matmuls and convolutions run on TF32 tensor cores (10-bit mantissa products, fp32
    accumulation); false keeps them in full fp32. No effect on the CPU."""
    grad_clip: float = 5.0
    """Gradient norm clipping of the backbone (DeepSpeed gradient_clipping); 0 disables."""
    gradient_accumulation_steps: int = 1
    """Micro-steps per optimizer step."""
    log_every: int = 10
    """Optimizer steps between progress lines."""
    output_dir: str = "runs/lvface"
    """Folder for checkpoints, the resolved config and logs."""
    collective_timeout_s: float = 600.0
    """Longest wait for another rank in any collective (gloo and NCCL); past it every rank exits with an error."""
    hang_dump_fraction: float = 0.5
    """After this fraction of collective_timeout_s without a finished step every rank writes its Python stacks to
    output_dir/stacks/ and reads the others' heartbeats (lvface/watchdog.py); 0 turns the watchdog off."""
    max_nonfinite_steps: int = 20
    """Consecutive skipped (non-finite loss or gradient) steps after which the run stops; 0 never stops."""
    batchnorm_sync: str = "average"
    """How the ranks' BatchNorm running statistics become one set before each evaluation and save: average
    (the mean over ranks) or broadcast (rank 0's, as torch DDP)."""

    def validate(self, where: str = "train") -> None:
        _choose(where, "precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _choose(where, "batchnorm_sync", self.batchnorm_sync, ("average", "broadcast"))
        _require(self.gradient_accumulation_steps > 0, where, "gradient_accumulation_steps", "must be positive")


@dataclass
class EvalConfig:
    bins: list[str] = field(default_factory=list)
    """insightface .bin verification sets evaluated during training."""
    every_steps: int = 0
    """Optimizer steps between evaluations; 0 evaluates only at the start and the end."""
    batch_size: int = 64
    """Images per rank per forward during evaluation."""
    at_start: bool = True
    """Evaluate once before the first step (the untrained baseline)."""

    def validate(self, where: str = "eval") -> None:
        """Every value of the right type is usable."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Optimizer steps between checkpoints; 0 saves only at the end."""
    keep_last: int = 2
    """Checkpoints kept; older ones are removed after a newer one is complete (0: every one is kept)."""
    resume: str = ""
    """'' starts fresh, 'auto' resumes from output_dir's latest checkpoint if any, or a checkpoint path."""
    init_backbone: str = ""
    """Fine-tune from these backbone weights, loaded strictly before training: a plain state_dict (insightface
    arcface_torch / LVFace .pt), a .safetensors file, or an lvface checkpoint folder; the head starts fresh."""
    async_save: bool = True
    """Write checkpoints in a background process per rank: a step waits only for a copy of the tensors into
    host memory; the files are written, fsynced, hashed and committed while training goes on (the end's
    and a preemption's save are committed before the run exits). The host buffers (the size of the rank's
    checkpoint) are allocated at the start. false: every rank writes before the next step. (Not `async`:
    a Python keyword cannot be a config field.)"""

    def validate(self, where: str = "checkpoint") -> None:
        """Every value of the right type is usable."""


@dataclass
class MetricsConfig:
    prometheus_port: int = 0
    """Port of the Prometheus exporter on each rank (port + local rank); 0 disables it."""
    tensorboard: bool = True
    """TensorBoard event files of lvface's scalars (loss, lr, stage, images/s, skipped steps, verification) in
    <output_dir>/tensorboard (lvface/tracking.py)."""
    csv: bool = False
    """The same scalars as step,tag,value rows in <output_dir>/scalars.csv."""
    wandb: bool = False
    """The same scalars to Weights & Biases (needs `pip install wandb`)."""
    wandb_project: str = "lvface"
    """W&B project of the run."""
    wandb_mode: str = "online"
    """W&B mode: online, or offline (written under <output_dir>/wandb; upload later with `wandb sync`)."""

    def validate(self, where: str = "metrics") -> None:
        _choose(where, "wandb_mode", self.wandb_mode, ("online", "offline"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------------
# Strict conversion from plain data
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp` and return it converted (int -> float only)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{where}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{where}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{where}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{where}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{where}': unsupported type {_type_name(tp)}")


# Keys that configs written for other trainers set but that choose nothing here: the error says what
# to do rather than guessing a near name.
_NOT_OPTIONS = {
    "optimizer.name": "the backbone and the head always train with AdamW (set optimizer.lr, betas, eps, "
                      "weight_decay); delete the key",
}


def _unknown_key(cls: type, key: str, where: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    full = f"{where}.{key}" if where else key
    if full in _NOT_OPTIONS:
        return ConfigError(f"unknown config key '{full}': {_NOT_OPTIONS[full]}")
    hint = f"; did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{full}'{hint} (valid keys here: {', '.join(names)})")


def _build(cls: type, data: dict, where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(cls, key, where)
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Ranges: one table per section, key -> (accepts the value, what the value must be). A table reads
# its own section only, so `check_ranges(section_name, section)` can run from that section's validate().
# --------------------------------------------------------------------------------------------------

Range = tuple[typing.Callable[[Any], bool], str]
_POSITIVE: Range = (lambda v: v > 0, "positive")
_NON_NEGATIVE: Range = (lambda v: v >= 0, "zero or more")
_FRACTION: Range = (lambda v: 0 <= v <= 1, "in [0, 1]")
_PROBABILITY = _FRACTION
_OPEN_FRACTION: Range = (lambda v: 0 <= v < 1, "in [0, 1)")


def _optional(check: Range) -> Range:
    return (lambda v: v is None or check[0](v), check[1] + " (or null for the default)")


RANGES: dict[str, dict[str, Range]] = {
    "model": {"num_features": _POSITIVE, "drop_path_rate": _optional(_OPEN_FRACTION),
              "mask_ratio": _optional(_OPEN_FRACTION)},
    "data": {"num_classes": _NON_NEGATIVE, "num_images": _NON_NEGATIVE, "batch_size": _POSITIVE,
             "num_workers": _NON_NEGATIVE, "dali_threads": _POSITIVE, "prefetch": _POSITIVE,
             "crop_p": _PROBABILITY, "crop_min_scale": (lambda v: 0 < v <= 1, "in (0, 1]"),
             "color_p": _PROBABILITY, "color_strength": _OPEN_FRACTION, "grayscale_p": _PROBABILITY,
             "blur_p": _PROBABILITY, "mask_p": _PROBABILITY,
             "blur_sigma": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[low, high] with 0 < low <= high")},
    "loss": {"scale": _POSITIVE,
             # cos(m1 * theta + m2) - m3 must still be able to rise above the other classes' cosines: with
             # m2 >= pi/2 or m3 >= 1 the target logit is never positive and the loss trains nothing
             "m1": (lambda v: 0 < v <= 4, "in (0, 4] (1 = no multiplicative margin; SphereFace uses up to 4)"),
             "m2": (lambda v: 0 <= v < math.pi / 2, "in [0, pi/2) radians (ArcFace: 0.5)"),
             "m3": (lambda v: 0 <= v < 1, "in [0, 1) (CosFace: 0.35 to 0.4)"),
             "prototype_momentum": _FRACTION, "chunk_mb": _POSITIVE},
    "optimizer": {"lr": _POSITIVE, "weight_decay": _NON_NEGATIVE, "eps": _POSITIVE,
                  "betas": (lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
                  "head_lr": _optional(_POSITIVE), "head_weight_decay": _optional(_NON_NEGATIVE)},
    "schedule": {"warmup_epochs": _NON_NEGATIVE, "warmup_steps": _NON_NEGATIVE, "power": _POSITIVE,
                 "min_lr_ratio": _FRACTION},
    "train": {"epochs": _POSITIVE, "max_steps": (lambda v: v >= 0, "zero (derive it from train.epochs) or more"),
              "grad_clip": (lambda v: v >= 0, "zero (no clipping) or more"), "gradient_accumulation_steps": _POSITIVE,
              "log_every": _POSITIVE, "collective_timeout_s": _POSITIVE, "max_nonfinite_steps": _NON_NEGATIVE,
              # the stacks are dumped before the collective timeout ends the run; 0 turns the watchdog off
              "hang_dump_fraction": _OPEN_FRACTION},
    "eval": {"every_steps": _NON_NEGATIVE, "batch_size": _POSITIVE},
    "checkpoint": {"every_steps": _NON_NEGATIVE, "keep_last": (lambda v: v >= 0, "zero (keep every checkpoint) or more")},
    "metrics": {"prometheus_port": (lambda v: 0 <= v <= 65535, "a TCP port, or 0 to disable the exporter")},
}


def check_ranges(where: str, section: Any) -> None:
    """Raise a ConfigError naming the first key of `section` (config section `where`) out of its range."""
    for key, (accepts, wanted) in RANGES.get(where, {}).items():
        value = getattr(section, key)
        if not accepts(value):
            raise ConfigError(f"config key '{where}.{key}' is {value!r}; it must be {wanted}")


def validate(cfg: Config) -> Config:
    """The checks that a type annotation cannot express: each section's own `validate` (choices and
    cross-field rules), then the section's row of RANGES (sense: positive lengths, margins in range)."""
    for section in dataclasses.fields(cfg):
        getattr(cfg, section.name).validate(section.name)
        check_ranges(section.name, getattr(cfg, section.name))
    return cfg


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def from_dict(data: dict) -> Config:
    """A Config from plain data (a parsed YAML file, or a checkpoint's stored config)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}")
    return validate(_build(Config, data))


def _merge(base: dict, update: dict, where: str = "") -> dict:
    out = dict(base)
    for key, value in update.items():
        dotted = f"{where}.{key}" if where else str(key)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, dotted)
        elif isinstance(value, dict) and isinstance(out.get(key), list) and all(isinstance(k, int) for k in value):
            out[key] = _merge_list(out[key], value, dotted)
        else:
            out[key] = value
    return out


def _merge_list(base: list, update: dict, where: str) -> list:
    """List-index overrides (`loss.stages.1.prototype_weight=0.3`): {index: value} into a copy of `base`."""
    out = list(base)
    for index, value in update.items():
        if not 0 <= index < len(out):
            raise ConfigError(f"command-line override '{where}.{index}': {where} has {len(out)} items "
                              f"(indices 0..{len(out) - 1})")
        both_maps = isinstance(value, dict) and isinstance(out[index], dict)
        out[index] = _merge(out[index], value, f"{where}.{index}") if both_maps else value
    return out


def parse_overrides(args: list[str]) -> dict:
    """Turn ['train.epochs=3', '--data.batch_size', '64'] into a nested dict of YAML-parsed values."""
    nested: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" not in arg:
            if i + 1 >= len(args):
                raise ConfigError(f"command-line override '{arg}' has no value; write {arg} VALUE or {arg[2:]}=VALUE")
            key, raw = arg[2:], args[i + 1]
            i += 2
        elif "=" in arg:
            key, raw = arg.lstrip("-").split("=", 1)
            i += 1
        else:
            raise ConfigError(f"command-line argument '{arg}' is not an override; write section.key=value")
        if "." not in key:
            raise ConfigError(f"command-line override '{key}' must be dotted as section.key (e.g. train.epochs=3)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"command-line override '{key}': cannot parse value {raw!r}: {exc}") from exc
        node = nested
        parts = [int(part) if part.isdigit() else part for part in key.split(".")]  # list indices
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command-line override '{key}' conflicts with another override")
        node[parts[-1]] = value
    return nested


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    return data or {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML file at `path` < dotted overrides. Errors name the file or key at fault."""
    data = load_yaml(path) if path else {}
    try:
        if overrides:
            # over the defaults, so that a list-index override finds the list the file left at its default
            base = _merge(Config().to_dict(), data) if isinstance(data, dict) else data
            data = _merge(base, parse_overrides(overrides))
        return from_dict(data)
    except ConfigError as exc:
        if path:
            raise ConfigError(f"{path}: {exc}") from None
        raise
