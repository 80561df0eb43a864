"""The CLIP-ReID text stage around the module: stage 1's cached image features, the prompts file between stages.

Stage 1 learns each identity's text context vectors on the frozen image side and writes them to
``model.text_prompts``; stage 2 reads them back (frozen) and scores every clip against every identity's text
feature. Stage 1 trains on image features computed once, before the first step, from each training tracklet's
un-augmented clip (CLIP-ReID's cache; ``model.stage1_features: online`` recomputes them every step instead).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info

from farreid.data.transforms import normalize_clip
from farreid.models.text import TextPromptLearner


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The module's trainer, or None outside one (``module.trainer`` raises then)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


@torch.no_grad()
def cache_image_features(module: L.LightningModule, loader: Iterable[dict]) -> torch.Tensor:
    """Stage 1's image features, computed once: the pooled projection of every clip ``loader`` yields.

    Args:
        module: the ReID module (its forward gives the pooled ``proj``), under its trainer's precision if any.
        loader: batches with ``frames``, ``camid``, ``mask`` and ``index`` (row of the result), covering
            indices 0..N-1 (the un-augmented training clips, in the training set's order).

    Returns:
        (N, P) float32 L2-normalised features on the module's device.
    """
    was_training = module.training
    module.eval()
    start, rows, indices = time.perf_counter(), [], []
    context = attached_trainer(module).precision_plugin.forward_context() if attached_trainer(module) else nullcontext()
    with context:
        for batch in loader:
            frames, camid = batch["frames"].to(module.device), batch["camid"].to(module.device)
            if frames.dtype == torch.uint8:  # the loaders' clips, normalised on the device
                frames = normalize_clip(frames)
            mask = batch["mask"].to(module.device) if "mask" in batch else None
            geometry = [batch[k].to(module.device) if k in batch else None for k in ("geometry", "geometry_known")]
            rows.append(F.normalize(module(frames, camid, mask, *geometry)["proj"].float(), dim=1))
            indices.append(torch.as_tensor(batch["index"], device=module.device))
    module.train(was_training)
    index = torch.cat(indices)
    if not torch.equal(index.sort().values, torch.arange(len(index), device=index.device)):
        raise RuntimeError(
            f"stage-1 feature cache: the loader yielded indices {index.tolist()[:10]}..., "
            f"expected each of 0..{len(index) - 1} once"
        )
    bank = torch.empty(len(index), rows[0].shape[1], device=module.device)
    bank[index] = torch.cat(rows)
    rank_zero_info(
        f"[farreid] stage 1: cached the image features of {len(index)} training tracklets "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return bank


def load_prompts(text: TextPromptLearner, path: str | None) -> torch.Tensor:
    """Read stage 1's context vectors into ``text`` and return every identity's text feature (C, P), unnormalised.

    Raises:
        ValueError: no path, or context vectors of another shape (stage 1 on other data).
        FileNotFoundError: stage 1 has not written the file.
    """
    if path is None:
        raise ValueError("model.text is set for stage 2 but model.text_prompts (stage 1's output) is not")
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"text prompts {path} not found: run stage 1 first "
            "(farreid fit --config <your config> --config configs/stage1.yaml)"
        )
    context = torch.load(path, map_location=text.context.device, weights_only=True)["context"]
    if context.shape != text.context.shape:
        raise ValueError(
            f"text prompts {path} hold context vectors of shape {tuple(context.shape)}, this model expects "
            f"{tuple(text.context.shape)} (num_classes x n_ctx x width): was stage 1 run on other data?"
        )
    with torch.no_grad():
        text.context.copy_(context)
        return text.all_features().float()


def save_prompts(text: TextPromptLearner, path: str | Path) -> Path:
    """Write the learned context vectors where stage 2 reads them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"context": text.context.detach().cpu()}, path)
    print(f"[farreid] stage 1 text prompts written to {path}")
    return path
