"""Parameter groups and the warm-up + cosine learning-rate schedule (plain PyTorch)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from torch import nn


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norm weights, embeddings and prompt tokens: vectors and tables that weight decay would shrink."""
    lowered = name.lower()
    return param.ndim <= 1 or "norm" in lowered or "embedding" in lowered or "prompt" in lowered or "context" in lowered


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr_mult: float = 1.0,
    tag: str = "",
) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group sharing one LR multiplier.

    Args:
        named_params: (name, parameter) pairs; parameters with ``requires_grad=False`` are skipped.
        lr_mult: multiplier applied to the optimizer's base learning rate for these groups.
        tag: a name for the groups (shown by ``LearningRateMonitor``).

    Returns:
        Up to two optimizer parameter groups with the keys ``params``, ``lr_mult``, ``name`` and, for the
        non-decayed group, ``weight_decay=0``.
    """
    decay, no_decay = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        (no_decay if _no_decay(name, param) else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "lr_mult": lr_mult, "name": f"{tag}decay"})
    if no_decay:
        groups.append({"params": no_decay, "lr_mult": lr_mult, "weight_decay": 0.0, "name": f"{tag}no_decay"})
    return groups


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
