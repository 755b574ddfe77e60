"""The head's AdamW: over W_local, outside the DeepSpeed engine.

The engine would broadcast rank 0's parameters and average gradients over ranks, both of which destroy
class sharding, so the head keeps its own optimizer over its shard (already partitioned: ZeRO would add
nothing). It steps at the gradient-accumulation boundary, beside engine.step().

Sampled rows only (default, `sparse_rows=True`). With Partial-FC sampling a class that was not sampled
in any micro-batch of the step has a zero gradient. Plain AdamW would still decay its weight and move
it with its stale first moment (m <- b1 * m; W -= lr * m_hat / ...): a class that is sampled 30% of the
time would drift on the other 70% of steps along a direction it no longer has evidence for. So only the
rows the head reports as touched (`head.touched_mask()`: sampled in some micro-batch since the last
step) get the AdamW update, decay and moment updates (computed for every row and kept where touched:
fixed shapes, no host sync); each row counts its own steps for the bias
correction (row_steps), so a row's update is exactly AdamW over the steps it took part in. Without
sampling every row is touched and this is plain AdamW. `sparse_rows=False` gives the dense behaviour
(every row, every step; the per-row step counts are then all equal to the global step).

fp16: the engine scales the loss, so W.grad arrives multiplied by the loss scale. step(grad_scale=S)
divides by S; when S != 1 the step is skipped (returns False) if the gradient of a stepped row is not
finite, as the engine skips its own step on overflow. Updates run over blocks of rows, so the
optimizer's temporaries stay small next to the W-sized moments.

impl="apex" (optimizer.head_impl): where NVIDIA apex is installed, the dense update (every row, one
step count) runs through apex's fused multi-tensor Adam kernel (apex.optimizers.FusedAdam in AdamW
mode) over the same weight and the same exp_avg / exp_avg_sq tensors, so checkpoints and resharding
are unchanged. It needs sparse_rows=False: per-row step counts have no fused equivalent.
"""

from __future__ import annotations

import torch


HEAD_OPTIMIZER_IMPLS = ("torch", "apex")  # optimizer.head_impl


class HeadAdamW(torch.optim.Optimizer):
    """AdamW (decoupled decay, torch.optim.AdamW's arithmetic) over `head.weight`, per-row step counts.

    State (W-shaped fp32 unless W is fp64): exp_avg, exp_avg_sq; row_steps [C_local] int64.
    The learning rate lives in param_groups[0]["lr"] (a scheduler sets it there).
    """

    def __init__(
        self,
        head,
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        sparse_rows: bool = True,
        block_rows: int = 8192,
        impl: str = "torch",
    ):
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"head optimizer: lr, eps and weight_decay must be >= 0 (got {lr}, {eps}, {weight_decay})")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"head optimizer: betas must be two numbers in [0, 1), got {betas}")
        super().__init__([head.weight], dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.head = head
        self.sparse_rows = sparse_rows
        self.block_rows = max(1, block_rows)
        weight = head.weight
        state = self.state[weight]
        state["exp_avg"] = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        state["row_steps"] = torch.zeros(weight.shape[0], dtype=torch.int64, device=weight.device)
        if impl not in HEAD_OPTIMIZER_IMPLS:
            raise ValueError(f"optimizer.head_impl={impl!r} is not one of {', '.join(HEAD_OPTIMIZER_IMPLS)}")
        self.impl = impl
        self._fused = _apex_fused_adam(weight, state, sparse_rows) if impl == "apex" else None

    @property
    def exp_avg(self) -> torch.Tensor:
        return self.state[self.head.weight]["exp_avg"]

    @property
    def exp_avg_sq(self) -> torch.Tensor:
        return self.state[self.head.weight]["exp_avg_sq"]

    @property
    def row_steps(self) -> torch.Tensor:
        return self.state[self.head.weight]["row_steps"]

    def _update_block(self, weight, grad, exp_avg, exp_avg_sq, steps, grad_scale: float) -> None:
        """One AdamW update of a block of rows, in place (views or gathered copies)."""
        group = self.param_groups[0]
        lr, (beta1, beta2), eps, decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if grad_scale != 1.0:
            grad = grad / grad_scale
        steps.add_(1)
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        t = steps.to(weight.dtype).unsqueeze(1)  # (c, 1)
        bias1 = 1.0 - torch.pow(beta1, t)
        bias2_sqrt = (1.0 - torch.pow(beta2, t)).sqrt()
        weight.mul_(1.0 - lr * decay)
        denom = (exp_avg_sq.sqrt() / bias2_sqrt).add_(eps)
        weight.sub_(exp_avg / denom * (lr / bias1))

    @torch.no_grad()
    def step(self, grad_scale: float = 1.0, *, finite_checked: bool = False) -> bool:
        """Update W_local; returns False when nothing was applied (no gradient or no touched row, or a
        non-finite gradient under a loss scale). Clears the head's touched rows either way.

        finite_checked: the caller already knows the gradient is finite (lvface.engine.train_step folds it
        into the step's flags), so the fp16 check - a host read - is not repeated. Without it, and with
        grad_scale != 1, one host read checks the gradient here."""
        head = self.head
        weight, grad = head.weight, head.weight.grad
        try:
            if grad is None or (self.sparse_rows and not head.has_touched_rows()):
                return False
            mask = head.touched_mask() if self.sparse_rows else None  # (C_local,) bool, or None for all rows
            if grad_scale != 1.0 and not finite_checked:
                checked = grad if mask is None else grad * mask.unsqueeze(1).to(grad.dtype)
                if not bool(torch.isfinite(checked).all()):
                    return False
            if self._fused is not None:
                self._fused_step(grad_scale)
                return True
            exp_avg, exp_avg_sq, row_steps = self.exp_avg, self.exp_avg_sq, self.row_steps
            for start in range(0, weight.shape[0], self.block_rows):
                block = slice(start, start + self.block_rows)
                if mask is None:
                    self._update_block(
                        weight[block], grad[block], exp_avg[block], exp_avg_sq[block], row_steps[block], grad_scale
                    )
                    continue
                # every row is computed, the touched ones kept: fixed shapes, no host sync (a row's update
                # is elementwise, so a touched row gets the same arithmetic as alone)
                targets = (weight[block], exp_avg[block], exp_avg_sq[block], row_steps[block])
                parts = [t.clone() for t in targets]
                self._update_block(parts[0], grad[block], parts[1], parts[2], parts[3], grad_scale)
                keep = mask[block]
                for target, part in zip(targets, parts):
                    target.copy_(torch.where(keep.view(-1, *([1] * (part.dim() - 1))), part, target))
            return True
        finally:
            head.clear_touched_rows()

    def _fused_step(self, grad_scale: float) -> None:
        """One dense AdamW step through apex's kernel, on this optimizer's own state tensors."""
        group, fused = self.param_groups[0], self._fused
        fused_group = fused.param_groups[0]
        for key in ("lr", "betas", "eps", "weight_decay"):
            fused_group[key] = group[key]
        # apex counts steps per group and adds one before the update; every row has the same count here
        fused_group["step"] = int(self.row_steps[0])
        if grad_scale != 1.0:
            self.head.weight.grad.div_(grad_scale)
        fused.step()
        self.row_steps.add_(1)


def _apex_fused_adam(weight: torch.Tensor, state: dict, sparse_rows: bool):
    """apex's FusedAdam (AdamW mode) over `weight`, sharing HeadAdamW's exp_avg / exp_avg_sq."""
    if sparse_rows:
        raise ValueError("optimizer.head_impl=apex steps every row with one step count: set "
                         "optimizer.head_sparse_rows=false with it, or optimizer.head_impl=torch")
    try:
        from apex.optimizers import FusedAdam
    except ImportError as exc:
        raise ValueError(
            f"optimizer.head_impl=apex needs NVIDIA apex's FusedAdam, which is not importable here ({exc}); install "
            "apex with its CUDA extensions (NGC PyTorch images carry it) or set optimizer.head_impl=torch") from None
    fused = FusedAdam([weight], lr=0.0, adam_w_mode=True)
    # apex creates its moments lazily when a parameter's state is empty: hand it ours instead
    fused.state[weight]["exp_avg"] = state["exp_avg"]
    fused.state[weight]["exp_avg_sq"] = state["exp_avg_sq"]
    return fused


def build_head_optimizer(head, opt_cfg, *, sparse_rows: bool | None = None, impl: str | None = None) -> HeadAdamW:
    """AdamW over head.weight from an OptimizerConfig: head_lr / head_weight_decay, else lr / weight_decay.

    sparse_rows (default optimizer.head_sparse_rows): update only the rows sampled since the last step
    (see the module docstring); False updates every row every step. impl: default optimizer.head_impl.
    """
    sparse_rows = opt_cfg.head_sparse_rows if sparse_rows is None else sparse_rows
    impl = opt_cfg.head_impl if impl is None else impl
    lr = opt_cfg.head_lr if opt_cfg.head_lr is not None else opt_cfg.lr
    decay = opt_cfg.head_weight_decay if opt_cfg.head_weight_decay is not None else opt_cfg.weight_decay
    betas = tuple(opt_cfg.betas)
    return HeadAdamW(head, lr=lr, betas=betas, eps=opt_cfg.eps, weight_decay=decay, sparse_rows=sparse_rows,
                     impl=impl)
