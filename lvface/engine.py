"""The DeepSpeed engine for the backbone and one training step (the learning-rate schedule: lvface/schedule.py).

The engine wraps the backbone only (DESIGN.md): DeepSpeed broadcasts rank 0's parameters at start and
averages gradients over ranks, which would destroy a class-sharded head. The head keeps its own
optimizer, and both step at the gradient-accumulation boundary.

DeepSpeed JSON configs may say "auto" for the values that lvface's own config decides (batch sizes,
accumulation, clipping, optimizer hyper-parameters, precision); those are filled in here. A concrete
value that contradicts lvface's config is an error rather than a silent winner.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from lvface.config import Config, ConfigError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# DeepSpeed configuration
# --------------------------------------------------------------------------------------------------


def resolve_precision(cfg: Config, ds: dict, device: torch.device) -> str:
    """fp32, bf16 or fp16 from lvface's train.precision and the DeepSpeed config's bf16/fp16 blocks."""
    ds_choice = None
    for name in ("bf16", "fp16"):
        enabled = ds.get(name, {}).get("enabled", False)
        if enabled is True:
            ds_choice = name
    precision = cfg.train.precision
    if precision == "auto":
        if ds_choice:
            return ds_choice
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if ds_choice and ds_choice != precision:
        raise ConfigError(
            f"train.precision is {precision} but the DeepSpeed config enables {ds_choice}; "
            f"set one of them to auto or make them agree"
        )
    return precision


def set_matmul_precision(tf32: bool, device: torch.device) -> None:
    """train.tf32: TF32 tensor cores for fp32 matmuls and convolutions on CUDA (or full fp32); the CPU has none."""
    if torch.device(device).type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    log.info("fp32 matmuls: %s (train.tf32=%s)", "TF32 tensor cores" if tf32 else "full fp32", str(tf32).lower())


def fused_adam_prebuilt() -> bool:
    """Whether this DeepSpeed install carries its FusedAdam op prebuilt (DS_BUILD_FUSED_ADAM=1, the Dockerfile);
    otherwise DeepSpeed would compile it with nvcc at start (minutes per node, and nvcc must be there)."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get("fused_adam", False))


def _choose_adam(params: dict, device: torch.device) -> None:
    """The backbone's Adam implementation, in the DeepSpeed optimizer params (a choice made there is kept)."""
    device_type = torch.device(device).type
    if device_type == "cpu":
        # DeepSpeed's CPU Adam op keeps beta^t by repeated multiplication inside the process but takes
        # pow(beta, t) in a resumed one; in fp32 they differ (0.999^3 by one ulp), so a resume would
        # not continue bit for bit. torch's AdamW derives the bias correction from the saved step
        # count alone (and needs no JIT-compiled op). CUDA's FusedAdam takes pow every step: kept.
        params.setdefault("torch_adam", True)
    elif device_type == "cuda" and "torch_adam" not in params and not fused_adam_prebuilt():
        params.update(torch_adam=True, fused=True)
        log.info("DeepSpeed's FusedAdam is not prebuilt here (it would be JIT-compiled with nvcc at start): the "
                 "backbone steps with torch.optim.AdamW(fused=True); set optimizer.params.torch_adam in the "
                 "DeepSpeed config to choose yourself")


def _fill(block: dict, key: str, value, where: str) -> None:
    current = block.get(key, "auto")
    if current == "auto":
        block[key] = value
    elif isinstance(value, float) and isinstance(current, (int, float)) and math.isclose(current, value, rel_tol=1e-9):
        return
    elif current != value:
        raise ConfigError(
            f"DeepSpeed config '{where + '.' if where else ''}{key}' is {current!r} but lvface's config implies {value!r}; "
            f"write \"auto\" there to take lvface's value, or change the lvface config"
        )


def build_ds_config(ds_path: str | Path | dict, cfg: Config, world_size: int, device: torch.device) -> dict:
    """Load a DeepSpeed JSON config and fill its "auto" fields from lvface's config."""
    if isinstance(ds_path, dict):
        ds = copy.deepcopy(ds_path)
        where = "<dict>"
    else:
        path = Path(ds_path)
        if not path.is_file():
            raise ConfigError(f"DeepSpeed config {path} not found; pass an existing JSON file to --ds_config")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from exc
        where = str(path)
    try:
        micro = cfg.data.batch_size
        accum = cfg.train.gradient_accumulation_steps
        _fill(ds, "train_micro_batch_size_per_gpu", micro, "")
        _fill(ds, "gradient_accumulation_steps", accum, "")
        _fill(ds, "train_batch_size", micro * accum * world_size, "")
        _fill(ds, "gradient_clipping", float(cfg.train.grad_clip), "")
        opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
        if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
            raise ConfigError(f"DeepSpeed config 'optimizer.type' is {opt.get('type')!r}; lvface trains with AdamW")
        params = opt.setdefault("params", {})
        _fill(params, "lr", float(cfg.optimizer.lr), "optimizer.params")
        _fill(params, "weight_decay", float(cfg.optimizer.weight_decay), "optimizer.params")
        _fill(params, "betas", [float(b) for b in cfg.optimizer.betas], "optimizer.params")
        _fill(params, "eps", float(cfg.optimizer.eps), "optimizer.params")
        _choose_adam(params, device)
        if "scheduler" in ds:
            raise ConfigError("DeepSpeed config has a 'scheduler' block; lvface's schedule section drives the "
                              "learning rate of both the backbone and the head: remove the block")
        precision = resolve_precision(cfg, ds, device)
        for name in ("bf16", "fp16"):
            block = ds.setdefault(name, {})
            block["enabled"] = precision == name
        ds.setdefault("steps_per_print", 10**9)  # lvface prints its own progress line
        ds.setdefault("wall_clock_breakdown", False)
        # lvface names a checkpoint by the samples seen, the same number on every rank by construction:
        # DeepSpeed's tag check would add two all-reduces to every save's stall and check nothing
        ds.setdefault("checkpoint", {}).setdefault("tag_validation", "Ignore")
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


# --------------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------------


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay: set[str] | None = None) -> list[dict]:
    """Two AdamW groups: decayed weights, and the parameters named in `no_decay` (default: the ViT's
    norms, biases, pos_embed and mask_token, lvface.models.vit.no_weight_decay_names)."""
    if no_decay is None:
        from lvface.models.vit import no_weight_decay_names

        no_decay = no_weight_decay_names(model)
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (plain if name in no_decay else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def build_engine(backbone: torch.nn.Module, ds_config: dict, groups: list[dict], lr_lambda: Callable[[int], float]):
    """deepspeed.initialize over the backbone alone, with a LambdaLR that DeepSpeed steps per optimizer step."""
    import deepspeed

    def make_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    engine, _, _, _ = deepspeed.initialize(
        model=backbone, model_parameters=groups, config=ds_config, lr_scheduler=make_scheduler
    )
    return engine


def engine_loss_scale(engine) -> float:
    """The fp16 dynamic loss scale DeepSpeed multiplies the loss by in backward (1.0 otherwise)."""
    if not engine.fp16_enabled():
        return 1.0
    return float(getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", 1.0)))


def model_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


# --------------------------------------------------------------------------------------------------
# One training step
# --------------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    loss_sum: torch.Tensor
    """Sum of this rank's micro-batch losses (detached; non-finite when the step was skipped)."""
    micro_batches: int
    skipped: bool
    """Nothing was applied on any rank: a loss or gradient was non-finite somewhere."""
    stop: bool
    """Some rank was asked to stop (preemption): the caller saves and exits after this step."""


@contextmanager
def _forced_overflow(optimizer, force: bool):
    """Make DeepSpeed's own overflow check report an overflow for one step (so that its skip, with
    its bookkeeping: gradients cleared, no LR step, loss scale update, agrees with lvface's)."""
    if not force:
        yield
        return
    check = getattr(optimizer, "check_overflow", None)
    if check is None:
        raise RuntimeError(f"DeepSpeed's optimizer {type(optimizer).__name__} has no overflow check, so a non-finite "
                           f"step cannot be skipped in the backbone; train with a ZeRO config (configs/zero1.json, "
                           f"zero2.json or zero3.json)")

    def check_overflow(*args, **kwargs):
        check(*args, **kwargs)
        optimizer.overflow = True

    saved_flag = getattr(optimizer, "check_grad_overflow", None)
    optimizer.check_overflow = check_overflow
    if saved_flag is False:
        optimizer.check_grad_overflow = True
    try:
        yield
    finally:
        del optimizer.check_overflow  # the class's method again
        if saved_flag is False:
            optimizer.check_grad_overflow = saved_flag


def step_flags(loss_sum: torch.Tensor, head, stop_requested: bool) -> torch.Tensor:
    """[non-finite, stop, bad labels, rows left out of a full Partial-FC sample] of this rank, on the device
    without a host sync (the loss and the head's gradient checked there), for the step's one all-reduce."""
    nonfinite = ~torch.isfinite(loss_sum)
    grad = head.weight.grad
    if grad is not None:
        nonfinite = nonfinite | ~torch.isfinite(grad).all()
    stop = torch.full((1,), float(stop_requested), device=loss_sum.device)
    return torch.cat([nonfinite.to(stop.dtype).reshape(1), stop, head.take_step_flags().to(stop.device)])


def agree_on_flags(loss_sum: torch.Tensor, head, stop_requested: bool, group) -> tuple[bool, bool]:
    """(skip, stop) for every rank: the step's flags all-reduced (MAX) and read once - the step's one
    host sync in lvface's code. Bad labels raise the head's error on every rank; rows left out of a
    full Partial-FC sample are logged."""
    flags = step_flags(loss_sum, head, stop_requested)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    nonfinite, stop, bad_labels, dropped = flags.tolist()
    if bad_labels:
        head.raise_for_bad_labels()  # on every rank: the flags are the same everywhere
    if dropped:
        log.warning("Partial-FC: %d rows of the global batch (the most on one rank) had their class left out of a "
                    "full sample this step; raise the stage's sample_rate so that int(sample_rate * classes per "
                    "rank) >= the global batch", int(dropped))
    return bool(nonfinite), bool(stop)


def train_step(engine, head, head_optimizer, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], *,
               accumulation: int, group, stop_requested: bool = False, metrics=None) -> StepResult:
    """One optimizer step of the backbone (DeepSpeed) and the head, taken together on every rank.

    `accumulation` micro-batches from `next_batch()` go forward and backward; at the accumulation
    boundary one all-reduce (MAX over `group`) of four flags decides for every rank at once:
    - skip: a non-finite loss (any micro-batch) or head gradient on some rank. DeepSpeed's own
      overflow check is made to agree (it also sees the backbone's gradients, all-reduced by
      DeepSpeed over the same ranks), and whatever DeepSpeed decides, the head follows: on a skip
      neither W, its optimizer moments, the EPL prototypes nor the backbone's BatchNorm statistics
      change on any rank;
    - stop: some rank received a stop signal (`stop_requested`, lvface/preemption.py);
    - bad labels, rows left out of a full Partial-FC sample: see `agree_on_flags`, whose read of the
      flags is the step's one host sync in lvface's code (tests/test_host_syncs.py).
    The learning rates are the caller's (set per step from the samples seen). `metrics`
    (lvface.metrics.TrainMetrics) times the phases of the step when given.
    """
    timer = metrics.timer if metrics is not None else (lambda name: contextlib.nullcontext())
    backward_timer = metrics.backward_timer if metrics is not None else (lambda tensor: contextlib.nullcontext())
    dtype = model_dtype(engine.module)
    # Forward passes move BatchNorm running statistics; a skipped step must not keep them (small).
    buffers = {name: buffer.clone() for name, buffer in engine.module.named_buffers()}
    loss_sum = torch.zeros((), device=head.weight.device)
    for micro in range(accumulation):
        with timer("data_wait"):
            images, labels = next_batch()
        with timer("backbone"):
            embeddings = engine(images.to(dtype=dtype))
        with timer("head"):
            loss = head(embeddings, labels)  # in the backbone's dtype: loss.head_dtype=auto reads it
        with backward_timer(embeddings):
            engine.backward(loss)
        loss_sum += loss.detach()
        if metrics is not None:
            metrics.count("images", images.shape[0])
        if micro < accumulation - 1:
            with timer("optimizer"):
                engine.step()  # DeepSpeed counts the micro-step; nothing is applied before the boundary
    if not engine.is_gradient_accumulation_boundary():
        raise RuntimeError(f"train_step: DeepSpeed is not at a gradient-accumulation boundary after {accumulation} "
                           f"micro-batches; its gradient_accumulation_steps must equal train.gradient_accumulation_steps")
    skip, stop = agree_on_flags(loss_sum, head, stop_requested, group)
    grad_scale = engine_loss_scale(engine)  # before engine.step(), which may change an fp16 loss scale
    with timer("optimizer"), _forced_overflow(engine.optimizer, skip):
        engine.step()
    applied = engine.was_step_applied()
    if skip and applied:
        raise RuntimeError("DeepSpeed applied a step that lvface asked it to skip (non-finite loss or gradient)")
    # The head follows DeepSpeed's decision, which includes the backbone's gradients.
    if applied:
        with timer("optimizer"):
            head_optimizer.step(grad_scale=grad_scale, finite_checked=True)  # the flags checked its gradient
            head.update_prototypes()  # after backward: the chunked path recomputes from them in backward
    else:
        head.discard_update()
        with torch.no_grad():
            for name, buffer in engine.module.named_buffers():
                buffer.copy_(buffers[name])
    head_optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum=loss_sum, micro_batches=accumulation, skipped=not applied, stop=stop)


class NonFiniteSteps:
    """Skipped steps: the total, the current run of consecutive ones, and the stop after `limit` in a row."""

    def __init__(self, limit: int):
        self.limit, self.total, self.consecutive = limit, 0, 0

    def record(self, step: int, skipped: bool) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        log.warning("step %d skipped on every rank: non-finite loss or gradient (%d in a row, %d in all)", step,
                    self.consecutive, self.total)
        if self.limit and self.consecutive >= self.limit:
            raise NonFiniteTraining(
                f"{self.consecutive} consecutive steps had a non-finite loss or gradient (train.max_nonfinite_steps="
                f"{self.limit}); the run stops. The last checkpoint is intact: lower optimizer.lr, check the data, "
                f"or use train.precision=fp32/bf16, then resume with checkpoint.resume=auto")


class NonFiniteTraining(RuntimeError):
    pass
