"""Parameter groups and the learning-rate schedules: warm-up + cosine, and the baseline's warm-up + multi-step.

The schedules are LR-factor functions (``warmup_cosine``, ``warmup_multistep``) and the ``LambdaLR`` schedulers
built on them that ``model.lr_scheduler`` chooses (``WarmupCosine``, ``WarmupMultiStep``)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Sequence

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights, embeddings and prompt tokens: vectors and tables that weight decay would shrink."""
    lowered = name.lower()
    return param.ndim <= 1 or "norm" in lowered or "embedding" in lowered or "prompt" in lowered or "context" in lowered


def _is_bias(name: str) -> bool:
    """Bias vectors, including attention ``in_proj_bias`` (the baseline's rule: "bias" in the parameter name)."""
    return name.rpartition(".")[2].endswith("bias")


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr_mult: float = 1.0,
    tag: str = "",
    bias_lr_mult: float = 1.0,
    bias_weight_decay: float | None = None,
    decay_vectors: bool = False,
) -> list[dict]:
    """Split trainable parameters into decayed, non-decayed and (optionally) bias groups.

    Args:
        named_params: (name, parameter) pairs; parameters with ``requires_grad=False`` are skipped.
        lr_mult: multiplier applied to the optimizer's base learning rate for these groups.
        tag: a name for the groups (shown by ``LearningRateMonitor``).
        bias_lr_mult: extra LR multiplier of biases (the baseline's ``BIAS_LR_FACTOR``).
        bias_weight_decay: weight decay of biases (the baseline's ``WEIGHT_DECAY_BIAS``); None = no decay.
        decay_vectors: False = norm weights, embeddings, prompt tokens and other vectors are not decayed
            (farreid); True = every parameter but the biases gets the optimizer's weight decay (the baseline).

    Returns:
        Up to three optimizer parameter groups with the keys ``params``, ``lr_mult``, ``name`` and, for the
        non-decayed and bias groups, ``weight_decay``. With the defaults biases join the non-decayed group.
    """
    separate_biases = bias_lr_mult != 1.0 or bias_weight_decay is not None
    decay, no_decay, bias = [], [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        if separate_biases and _is_bias(name):
            bias.append(param)
        elif not decay_vectors and _no_decay(name, param):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "lr_mult": lr_mult, "name": f"{tag}decay"})
    if no_decay:
        groups.append({"params": no_decay, "lr_mult": lr_mult, "weight_decay": 0.0, "name": f"{tag}no_decay"})
    if bias:
        wd = 0.0 if bias_weight_decay is None else bias_weight_decay
        groups.append({"params": bias, "lr_mult": lr_mult * bias_lr_mult, "weight_decay": wd, "name": f"{tag}bias"})
    return groups


def reid_param_groups(module: nn.Module) -> list[dict]:
    """The groups of a :class:`~farreid.module.ReIDModule`: in stage 1 the text context; in stage 2 the pretrained
    blocks that train at ``backbone_lr_mult`` and everything new (adapters, prompts, pooling, heads, objectives)
    at 1x, each split by :func:`param_groups` with the module's bias and decay settings."""
    h = module.hparams
    bias = {key: h[key] for key in ("bias_lr_mult", "bias_weight_decay", "decay_vectors")}
    if h.stage == 1:
        return param_groups(module.text.named_parameters(prefix="text"), tag="text_", **bias)
    new = list(module.backbone.new_parameters())
    for prefix in ("pooling", "head_cls", "head_proj", "objectives"):  # objectives: e.g. a learned centre loss
        new.extend(getattr(module, prefix).named_parameters(prefix=prefix))
    return param_groups(
        module.backbone.pretrained_trainable_parameters(), h.backbone_lr_mult, tag="backbone_", **bias
    ) + param_groups(new, 1.0, tag="new_", **bias)


def apply_lr_mult(optimizer) -> None:
    """Scale every group's ``lr`` by its ``lr_mult`` once, after construction (before any scheduler)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_mult", 1.0)


def warmup_cosine(warmup_steps: int, total_steps: int | Callable[[], int], min_lr_ratio: float = 0.01):
    """LR factor for ``LambdaLR``: linear warm-up from ~0 to 1 over ``warmup_steps``, then cosine to ``min_lr_ratio``.

    Args:
        warmup_steps: optimizer steps of linear warm-up.
        total_steps: total optimizer steps of the run, or a function returning it. A function is called at the
            first step after the warm-up, not before: ``trainer.estimated_stepping_batches`` builds the training
            loader, and building it before a checkpoint is restored would start a resumed epoch from the wrong
            sampler position.
        min_lr_ratio: final LR as a fraction of the peak.
    """
    warmup_steps = max(int(warmup_steps), 0)
    resolved: list[int] = []

    def total() -> int:
        if not resolved:
            value = total_steps() if callable(total_steps) else total_steps
            resolved.append(max(int(value), 1))
        return resolved[0]

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min((step - warmup_steps) / max(total() - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_multistep(warmup_steps: int, milestones: Sequence[int], gamma: float = 0.1, warmup_factor: float = 0.1):
    """LR factor for ``LambdaLR``: the baseline's ``WarmupMultiStepLR`` (linear warm-up, step decay).

    factor(t) = w(t) * gamma ** (number of milestones <= t), with w(t) = warmup_factor * (1 - t / warmup_steps)
    + t / warmup_steps for t < warmup_steps and 1 after. t counts scheduler steps (epochs in the baseline).

    Args:
        warmup_steps: steps of linear warm-up (``WARMUP_ITERS``).
        milestones: steps at which the LR is multiplied by ``gamma`` (``STEPS``).
        gamma: decay factor (``GAMMA``).
        warmup_factor: factor at t = 0 (``WARMUP_FACTOR``).
    """
    milestones = sorted(int(m) for m in milestones)

    def factor(step: int) -> float:
        warm = 1.0
        if step < warmup_steps:
            alpha = step / warmup_steps
            warm = warmup_factor * (1.0 - alpha) + alpha
        return warm * gamma ** bisect.bisect_right(milestones, step)

    return factor


class WarmupCosine(LambdaLR):
    """:func:`warmup_cosine` as a scheduler (``model.lr_scheduler``): linear warm-up, cosine to ``min_lr_ratio``.

    Args:
        optimizer: the optimizer (given by the module).
        warmup_steps: warm-up length in scheduler steps (``model.lr_interval`` units).
        min_lr_ratio: final LR as a fraction of the peak.
        total_steps: the run's length in scheduler steps, or a function returning it (given by the module: the
            trainer's estimated stepping batches, looked up lazily, or ``max_epochs``).
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 500, min_lr_ratio: float = 0.01, total_steps=None):
        if total_steps is None:
            raise ValueError("WarmupCosine needs total_steps (the run's length; ReIDModule passes it)")
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, warmup_cosine(warmup_steps, total_steps, min_lr_ratio))


class WarmupMultiStep(LambdaLR):
    """:func:`warmup_multistep` as a scheduler: the baseline's ``WarmupMultiStepLR`` (linear warm-up, step decay).

    Args:
        optimizer: the optimizer (given by the module).
        warmup_steps: steps of linear warm-up (``WARMUP_ITERS``), in ``model.lr_interval`` units.
        milestones: steps at which the LR is multiplied by ``gamma`` (``STEPS``).
        gamma: decay factor (``GAMMA``).
        warmup_factor: factor at step 0 (``WARMUP_FACTOR``).
        total_steps: unused (the schedule does not depend on the run's length); accepted from the module.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 10,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        warmup_factor: float = 0.1,
        total_steps=None,
    ):
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, warmup_multistep(warmup_steps, milestones, gamma, warmup_factor))


def schedule_summary(trainer, lr_interval: str) -> tuple[str, str | None]:
    """A line saying how long a fit is (steps per epoch, optimizer steps, the warm-up's share), and a warning when
    the warm-up is not shorter than the run (with ``lr_interval`` "epoch" the schedule counts epochs)."""
    per_epoch, total = trainer.num_training_batches, int(trainer.estimated_stepping_batches)
    warmup = getattr(trainer.lr_scheduler_configs[0].scheduler, "warmup_steps", 0)
    unit, length = ("epochs", trainer.max_epochs) if lr_interval == "epoch" else ("steps", total)
    info = (
        f"[farreid] {per_epoch} steps per epoch, {total} optimizer steps in all; warm-up {warmup} {unit} "
        f"({100 * warmup / max(length, 1):.0f}% of the run)"
    )
    warning = f"warm-up of {warmup} {unit} is not shorter than the run ({length} {unit}): LR never peaks"
    return info, warning if warmup >= length else None
