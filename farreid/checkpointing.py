"""Slim checkpoints: what the module's ``on_save_checkpoint`` / ``on_load_checkpoint`` hooks do.

A frozen ViT-L/14 (and text tower) is re-read from the pretrained CLIP directory, so a checkpoint keeps only the
weights that train (and the learned text prompts). Loading checks the checkpoint against the model and refills
the frozen weights from the model's own (pretrained) state.
"""

from __future__ import annotations

import logging
import os

from torch import nn

log = logging.getLogger(__name__)

# Name segments that wrappers insert into parameter and state-dict names: FSDP, activation checkpointing,
# torch.compile's OptimizedModule and DDP / DataParallel.
_WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "module"})
# Kept whatever trains: the learned prompts are trained in stage 1 and frozen in stage 2.
_KEEP_ALWAYS = ("text.context",)


def canonical_key(name: str) -> str:
    """A parameter or state-dict name without wrapper segments: ``_fsdp_wrapped_module.backbone.x`` -> ``backbone.x``.

    No farreid module is called ``module``, so dropping that segment cannot merge two real names.
    """
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def trainable_keys(model: nn.Module) -> set[str]:
    """Canonical state-dict names of the parameters that train (wrapper segments removed)."""
    return {canonical_key(name) for name, p in model.named_parameters() if p.requires_grad}


def reloadable_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of frozen weights that can be re-read from a pretrained directory."""
    prefixes = []
    if getattr(model.backbone, "pretrained", None):
        prefixes.append("backbone.")
    if getattr(model, "text", None) is not None and getattr(model.text, "pretrained", None):
        prefixes.append("text.")
    return tuple(prefixes)


def slim(model: nn.Module, checkpoint: dict) -> None:
    """Drop the frozen pretrained weights from ``checkpoint["state_dict"]`` and record what was kept.

    Names are compared in canonical form (see :func:`canonical_key`), so wrapper prefixes that a strategy or
    ``torch.compile`` adds to parameter or state-dict names do not decide what is kept. When a trained parameter
    cannot be found among the state-dict keys at all (e.g. FSDP's flattened parameters) nothing is dropped: a
    full checkpoint is larger but loses nothing.
    """
    state = checkpoint["state_dict"]
    trainable = trainable_keys(model)
    canonical = {key: canonical_key(key) for key in state}
    unmatched = trainable - set(canonical.values())
    prefixes = reloadable_prefixes(model) if not unmatched else ()
    if unmatched:
        log.warning(
            "slim checkpoint disabled: %d trained parameters have no state-dict key (%s); saving every weight",
            len(unmatched),
            sorted(unmatched)[:3],
        )
    dropped = [
        key
        for key, name in canonical.items()
        if prefixes and name.startswith(prefixes) and name not in trainable and not name.startswith(_KEEP_ALWAYS)
    ]
    for key in dropped:
        del state[key]
    checkpoint["farreid"] = {
        "dropped_frozen_keys": len(dropped),
        "pretrained": getattr(model.backbone, "pretrained", None),
        "trainable": sorted(trainable),
    }


def check_and_refill(model: nn.Module, checkpoint: dict) -> None:
    """Check ``checkpoint`` against ``model``, then refill the frozen weights a slim checkpoint left out.

    Raises:
        ValueError: unknown keys or shape mismatches (another configuration), or a weight that trains in this
            model missing from the checkpoint (refilling it from the pretrained directory would silently
            replace fine-tuned weights with CLIP's).
    """
    state = checkpoint["state_dict"]
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if unknown or mismatched:
        details = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]
        raise ValueError(
            "checkpoint does not fit this model configuration (was it trained with another config?): "
            f"{len(unknown)} unknown keys {unknown[:5]}, {len(mismatched)} shape mismatches {details[:5]}"
        )
    present = {canonical_key(k) for k in state}
    missing_trained = sorted(trainable_keys(model) - present)
    if missing_trained:
        raise ValueError(
            f"checkpoint lacks {len(missing_trained)} weights that train in this model, e.g. "
            f"{missing_trained[:5]}: was it saved under a strategy that renames parameters, or with other "
            "trainable_blocks? Refusing to refill trained weights from the pretrained directory."
        )
    meta = checkpoint.get("farreid", {})
    if meta.get("dropped_frozen_keys"):
        pretrained = getattr(model.backbone, "pretrained", None)
        if meta.get("pretrained") and pretrained and os.path.abspath(meta["pretrained"]) != os.path.abspath(pretrained):
            log.warning("checkpoint was trained on %s, frozen weights now come from %s", meta["pretrained"], pretrained)
        for key, value in own.items():  # frozen weights: already loaded from the pretrained directory
            state.setdefault(key, value)
