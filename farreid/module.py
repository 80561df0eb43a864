"""The LightningModule: CLIP vision backbone -> temporal pooling -> BNNeck heads, losses, optimizer groups.

Two stages (DOMAIN.md §4, CLIP-ReID):
- ``stage: 1`` trains only the per-identity text context vectors of :class:`TextPromptLearner` against image
  features of the frozen backbone (image<->text SupCon) and writes them to ``text_prompts``;
- ``stage: 2`` (default) reads them back frozen from the same path and trains the image side with the ID,
  triplet, image->text cross-entropy and SupCon losses. Without ``text`` the module is a plain image model.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.core.mixins import hparams_mixin
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from farreid.data.transforms import normalize_clip
from farreid.losses import BatchHardTripletLoss, SupConLoss, scaled_logits
from farreid.models.backbone import CLIPVisionBackbone
from farreid.models.heads import BNNeck
from farreid.models.pooling import TemporalAttentionPooling, TemporalPooling
from farreid.models.text import TextPromptLearner
from farreid.optim import apply_lr_mult, param_groups, warmup_cosine, warmup_multistep

log = logging.getLogger(__name__)

# Name segments that wrappers insert into parameter and state-dict names: FSDP, activation checkpointing,
# torch.compile's OptimizedModule and DDP / DataParallel.
_WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "module"})


def canonical_key(name: str) -> str:
    """A parameter or state-dict name without wrapper segments: ``_fsdp_wrapped_module.backbone.x`` -> ``backbone.x``.

    No farreid module is called ``module``, so dropping that segment cannot merge two real names.
    """
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


class ReIDModule(L.LightningModule):
    """Video person ReID on CLIP: per-frame backbone features, temporal pooling, BNNeck heads.

    Args:
        backbone: the vision tower (adapters, prompts and selective fine-tuning are configured on it).
        pooling: builds the temporal pooling (a :class:`~farreid.models.pooling.TemporalPooling`:
            ``TemporalAttentionPooling`` or ``MeanPooling``) from the embedding width; its frame weights also pool
            the projection and the intermediate CLS.
        num_classes: training identities; linked from ``data.num_classes`` by the CLI.
        text: builds the text prompt learner from ``num_classes``; None trains without text supervision.
        stage: 1 = learn the text prompts on the frozen image side, 2 = train the image side.
        text_prompts: file the stage-1 context vectors are written to and stage 2 reads them from.
        id_weight: weight of each head's identity loss (the pooled-CLS head and the projection head).
        triplet_weight: weight of each of the two batch-hard triplet losses, on the pooled CLS and on the pooled
            projection (both before the BN neck). mid_triplet_weight: weight of the triplet on the pooled
            intermediate CLS (``backbone.mid_block``).
        i2t_weight: weight of the image->text cross-entropy of the pooled projection against every identity's
            text feature. supcon_weight: weight of each stage-2 SupCon term (image->text and text->image).
        label_smoothing: epsilon of the identity and image->text cross-entropies. triplet_margin: cosine margin.
        image_text_logits: "cosine" = logit_scale x cosine similarity of the L2-normalised features; "raw" = the
            plain dot product of the unnormalised projection and text features (the baseline, CLIP-ReID).
        logit_scale: multiplier of cosine similarities in the image<->text losses (CLIP's is 100).
        optimizer: builds the optimizer from parameter groups (base LR, weight decay in its init args).
        backbone_lr_mult: LR multiplier of the pretrained blocks that train (selective fine-tuning).
        bias_lr_mult, bias_weight_decay, decay_vectors: bias LR factor, bias weight decay (None = 0) and
            whether norm weights / prompts / other vectors decay; see :func:`farreid.optim.param_groups`.
        lr_schedule: "cosine" (linear warm-up from ~0, cosine to ``min_lr_ratio``) or "multistep" (linear warm-up
            from ``warmup_factor``, x ``lr_gamma`` at each of ``lr_milestones``).
        lr_interval: "step" or "epoch": the unit of ``warmup_steps`` and ``lr_milestones`` and when the LR moves.
        warmup_steps: warm-up length in ``lr_interval`` units. min_lr_ratio: final LR factor of the cosine.
        warmup_factor: LR factor at the start of the multistep warm-up. lr_milestones, lr_gamma: its decay.
        flip_tta: average the embedding of each clip with its horizontal flip at test time.
        eval_feature: "bn" (after the BNNeck) or "raw" (before) for the retrieval embedding.
        stage1_features: image features of stage 1. ``"cached"`` (default, as CLIP-ReID): each training
            tracklet's feature is computed once, before the first step, from its un-augmented clip (the evaluation
            frames and transform) and the prompts train on these; training batches then decode no frame.
            ``"online"``: the frozen image side runs on every augmented training clip at every step. Each process
            computes the whole cache (one un-augmented pass over the training set).
    """

    def __init__(
        self,
        backbone: CLIPVisionBackbone,
        pooling: Callable[[int], TemporalPooling] = TemporalAttentionPooling,
        num_classes: int = 0,
        text: Callable[[int], TextPromptLearner] | None = None,
        stage: int = 2,
        text_prompts: str | None = None,
        id_weight: float = 1.0,
        triplet_weight: float = 1.0,
        mid_triplet_weight: float = 0.5,
        i2t_weight: float = 1.0,
        supcon_weight: float = 0.0,
        label_smoothing: float = 0.1,
        triplet_margin: float = 0.3,
        image_text_logits: str = "cosine",
        logit_scale: float = 100.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        backbone_lr_mult: float = 0.1,
        bias_lr_mult: float = 1.0,
        bias_weight_decay: float | None = None,
        decay_vectors: bool = False,
        lr_schedule: str = "cosine",
        lr_interval: str = "step",
        warmup_steps: int = 500,
        min_lr_ratio: float = 0.01,
        warmup_factor: float = 0.1,
        lr_milestones: list[int] | None = None,
        lr_gamma: float = 0.1,
        flip_tta: bool = True,
        eval_feature: str = "bn",
        stage1_features: str = "cached",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1 (linked from data.num_classes), got {num_classes}")
        if stage not in (1, 2):
            raise ValueError(f"model.stage must be 1 or 2, got {stage}")
        if stage == 1 and text is None:
            raise ValueError("model.stage=1 learns text prompts: set model.text (a TextPromptLearner)")
        if eval_feature not in ("bn", "raw"):
            raise ValueError(f"model.eval_feature must be 'bn' or 'raw', got {eval_feature!r}")
        for key, value, allowed in (
            ("image_text_logits", image_text_logits, ("cosine", "raw")),
            ("lr_schedule", lr_schedule, ("cosine", "multistep")),
            ("lr_interval", lr_interval, ("step", "epoch")),
        ):
            if value not in allowed:
                raise ValueError(f"model.{key} must be one of {list(allowed)}, got {value!r}")
        if stage1_features not in ("cached", "online"):
            raise ValueError(f"model.stage1_features must be 'cached' or 'online', got {stage1_features!r}")
        self.hparams_num_classes = num_classes
        self._save_hyperparameters()
        self.backbone = backbone
        self.pooling = pooling(backbone.embed_dim)
        self.head_cls = BNNeck(backbone.embed_dim, num_classes)
        self.head_proj = BNNeck(backbone.proj_dim, num_classes)
        self.text = text(num_classes) if text is not None else None
        self.optimizer_factory = optimizer
        self.triplet_loss = BatchHardTripletLoss(margin=triplet_margin, metric="cosine")
        self.supcon = SupConLoss()
        self.register_buffer("text_bank", torch.empty(0), persistent=False)
        # Stage 1, cached: (N, P) L2-normalised image features, row i for training tracklet i.
        self.register_buffer("image_bank", torch.empty(0), persistent=False)
        if stage == 1:  # only the text context vectors learn in stage 1
            for part in (self.backbone, self.pooling, self.head_cls, self.head_proj):
                part.requires_grad_(False)
        elif self.text is not None:
            self.text.requires_grad_(False)

    def _save_hyperparameters(self) -> None:
        """Save the init arguments; ``backbone``/``pooling``/``text`` only as configs, never as objects.

        Built by LightningCLI, the saved values are the config (``class_path`` + ``init_args`` of each part), so that
        ``ReIDModule.load_from_checkpoint(path)`` rebuilds the whole model (``farreid embed``/``export``). Built in
        Python, the parts are objects (a module, a class, a lambda): not hyperparameters, and never deep-copied.
        """
        # Lightning's hand-over of the CLI config to save_hyperparameters (a context variable set while the CLI
        # instantiates the model); if a later Lightning renames it, the parts are simply not saved.
        given = getattr(hparams_mixin, "_given_hyperparameters", None)
        from_config = given is not None and given.get() is not None
        self.save_hyperparameters(ignore=["optimizer"] if from_config else ["backbone", "pooling", "text", "optimizer"])
        # The classifier width as linked from the data (the CLI's config may hold the value before the link). Not
        # in the logged copy: loggers merge it with the datamodule's, whose num_classes is only an override.
        self._hparams["num_classes"] = self.hparams_num_classes
        self._hparams_initial.pop("num_classes", None)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, frames: torch.Tensor, camids: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """Pooled clip features.

        Args:
            frames: (B, T, 3, H, W) normalised frames. camids: (B,) 0 ground, 1/2 UAV session.
            mask: (B, T) True on real frames, False on padding repeats.

        Returns:
            dict with ``cls`` (B, D), ``proj`` (B, P), ``mid`` (B, D) or None, ``weights`` (B, T).
        """
        out = self.backbone.forward_features(frames, camids)
        cls, weights = self.pooling(out.cls, mask)
        w = weights.unsqueeze(-1).to(out.proj.dtype)  # (B, T) -> (B, T, 1)
        proj = (w * out.proj).sum(1)
        mid = (w * out.mid_cls).sum(1) if out.mid_cls is not None else None
        return {"cls": cls, "proj": proj, "mid": mid, "weights": weights}

    def _embed_once(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = self(batch["frames"], batch["camid"], batch.get("mask"))
        # The backbone runs under the trainer's precision; the heads, the sum and the normalisation of the
        # retrieval embedding run in float32 (under bf16 autocast the BNNeck output would keep 3 digits).
        with torch.autocast(out["cls"].device.type, enabled=False):
            cls, proj = out["cls"], out["proj"]
            if self.hparams.eval_feature == "bn":
                dtype = self.head_cls.bn.weight.dtype  # float32 under mixed precision
                cls, proj = self.head_cls(cls.to(dtype))[0], self.head_proj(proj.to(dtype))[0]
            return torch.cat([cls, proj], dim=1).float(), out["weights"].float()

    @torch.no_grad()
    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieval embedding: concatenated pooled CLS and projection, L2-normalised, float32 under any precision.

        Returns:
            ((B, D+P) float32 embeddings, (B, T) float32 frame weights).
        """
        feats, weights = self._embed_once(batch)
        if self.hparams.flip_tta:
            flipped = dict(batch, frames=batch["frames"].flip(-1))
            feats = feats + self._embed_once(flipped)[0]
        with torch.autocast(feats.device.type, enabled=False):
            return F.normalize(feats, dim=1), weights

    # ---------------------------------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        # One clip of the configured geometry: Lightning's model summary then counts real FLOPs instead of 0.
        data = getattr(getattr(self._trainer, "datamodule", None), "hparams", {})
        if stage == "fit" and "image_size" in data and "num_frames" in data:
            height, width = data["image_size"]
            frames = torch.zeros(1, data["num_frames"], 3, height, width)  # (B=1, T, 3, H, W)
            self.example_input_array = (frames, torch.zeros(1, dtype=torch.long))

    def on_fit_start(self) -> None:
        if self.hparams.stage == 1:
            if self.hparams.stage1_features == "cached":
                self.image_bank = self.cache_image_features(self.trainer.datamodule.cached_feature_loader())
            return
        if self.text is None:
            return
        path = self.hparams.text_prompts
        if path is None:
            raise ValueError("model.text is set for stage 2 but model.text_prompts (stage 1's output) is not")
        if not Path(path).is_file():
            raise FileNotFoundError(
                f"text prompts {path} not found: run stage 1 first "
                "(farreid fit --config <your config> --config configs/stage1.yaml)"
            )
        context = torch.load(path, map_location=self.device, weights_only=True)["context"]
        if context.shape != self.text.context.shape:
            raise ValueError(
                f"text prompts {path} hold context vectors of shape {tuple(context.shape)}, this model expects "
                f"{tuple(self.text.context.shape)} (num_classes x n_ctx x width): was stage 1 run on other data?"
            )
        with torch.no_grad():
            self.text.context.copy_(context)
        with torch.no_grad():  # unnormalised: _image_text() normalises for image_text_logits="cosine"
            self.text_bank = self.text.all_features().float()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        labels = batch["label"]
        losses = self._stage1_losses(batch, labels) if self.hparams.stage == 1 else self._stage2_losses(batch, labels)
        loss = sum(losses.values())
        self._check_finite(loss, losses, batch_idx)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, on_step=True, on_epoch=False)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _check_finite(self, loss: torch.Tensor, losses: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Raise on every rank when the loss of any rank is non-finite.

        The flag is all-gathered (one tiny collective and one host sync per step, before the backward pass), so
        every rank raises at the same step: a rank raising alone would leave the others in the gradient
        all-reduce until the NCCL timeout (30 min). The collective costs about as much as the host sync that any
        finite check needs; the step's other host syncs were removed (camid and mask checks, triplet mining).
        """
        bad = (~torch.isfinite(loss.detach())).to(torch.int32).reshape(1)  # (1,)
        if self._trainer is not None and self.trainer.world_size > 1:
            bad = self.all_gather(bad).flatten()  # (world,)
        if not bool(bad.any()):
            return
        ranks = bad.nonzero().flatten().tolist()
        where = f"on rank(s) {ranks} " if self._trainer is not None and self.trainer.world_size > 1 else ""
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        raise FloatingPointError(
            f"non-finite training loss {where}at global step {self.global_step} (epoch {self.current_epoch}, "
            f"batch {batch_idx}); this rank's terms: {parts}. Lower the learning rate or check the input frames."
        )

    @torch.no_grad()
    def cache_image_features(self, loader: Iterable[dict]) -> torch.Tensor:
        """Stage 1's image features, computed once: the pooled projection of every clip ``loader`` yields.

        Args:
            loader: batches with ``frames``, ``camid``, ``mask`` and ``index`` (row of the result), covering
                indices 0..N-1 (the un-augmented training clips, in the training set's order).

        Returns:
            (N, P) float32 L2-normalised features on the module's device.
        """
        was_training = self.training
        self.eval()
        start, rows, indices = time.perf_counter(), [], []
        context = self.trainer.precision_plugin.forward_context() if self._trainer is not None else nullcontext()
        with context:
            for batch in loader:
                frames, camid = batch["frames"].to(self.device), batch["camid"].to(self.device)
                if frames.dtype == torch.uint8:  # the loaders' clips, normalised on the device
                    frames = normalize_clip(frames)
                mask = batch["mask"].to(self.device) if "mask" in batch else None
                rows.append(F.normalize(self(frames, camid, mask)["proj"].float(), dim=1))
                indices.append(torch.as_tensor(batch["index"], device=self.device))
        self.train(was_training)
        index = torch.cat(indices)
        if not torch.equal(index.sort().values, torch.arange(len(index), device=index.device)):
            raise RuntimeError(
                f"stage-1 feature cache: the loader yielded indices {index.tolist()[:10]}..., "
                f"expected each of 0..{len(index) - 1} once"
            )
        bank = torch.empty(len(index), rows[0].shape[1], device=self.device)
        bank[index] = torch.cat(rows)
        rank_zero_info(
            f"[farreid] stage 1: cached the image features of {len(index)} training tracklets "
            f"in {time.perf_counter() - start:.1f} s"
        )
        return bank

    def _stage1_losses(self, batch: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.image_bank.numel() > 0:
            image = self.image_bank[batch["index"]]  # cached, already normalised
        else:
            if "frames" not in batch:
                raise RuntimeError("stage 1: this batch has no frames and no image features were cached")
            with torch.no_grad():
                out = self(batch["frames"], batch["camid"], batch.get("mask"))
                image = F.normalize(out["proj"].float(), dim=1)
        text = F.normalize(self.text(labels).float(), dim=1)
        scale = self.hparams.logit_scale
        return {
            "i2t_supcon": self.supcon(image * scale, text, labels, labels),
            "t2i_supcon": self.supcon(text * scale, image, labels, labels),
        }

    def _image_text(self, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Image features (B, P), every identity's text feature (C, P) and the scale of their dot products."""
        if self.hparams.image_text_logits == "raw":
            return proj.float(), self.text_bank, 1.0
        return F.normalize(proj.float(), dim=1), F.normalize(self.text_bank, dim=1), self.hparams.logit_scale

    def _stage2_losses(self, batch: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The baseline's stage-2 objective (VSLA-CLIP / CLIP-ReID), each term weighted by its hyperparameter.

        ID: label-smoothed CE of both BNNeck heads. Triplet: batch-hard cosine on the pooled CLS and projection
        before the BN neck, plus the intermediate CLS. i2t: label-smoothed CE of the pooled projection against all
        identities' text features. SupCon: image->text and text->image against the batch's own text features.
        """
        h = self.hparams
        out = self(batch["frames"], batch["camid"], batch.get("mask"))
        _, logits_cls = self.head_cls(out["cls"])
        _, logits_proj = self.head_proj(out["proj"])
        smoothed = h.label_smoothing
        losses = {
            "id": h.id_weight
            * (
                F.cross_entropy(logits_cls.float(), labels, label_smoothing=smoothed)
                + F.cross_entropy(logits_proj.float(), labels, label_smoothing=smoothed)
            ),
            "triplet": h.triplet_weight
            * (self.triplet_loss(out["cls"].float(), labels) + self.triplet_loss(out["proj"].float(), labels)),
        }
        if out["mid"] is not None and h.mid_triplet_weight > 0:
            losses["mid_triplet"] = h.mid_triplet_weight * self.triplet_loss(out["mid"].float(), labels)
        if self.text is not None and self.text_bank.numel() > 0:
            image, bank, scale = self._image_text(out["proj"])
            if h.i2t_weight > 0:
                logits = scaled_logits(image, bank, scale)  # (B, P) x (P, C) -> (B, C), float32 under autocast
                losses["i2t"] = h.i2t_weight * F.cross_entropy(logits, labels, label_smoothing=smoothed)
            if h.supcon_weight > 0:
                text = bank[labels]  # (B, P): each clip's own identity text, as the baseline recomputes per batch
                losses["supcon"] = h.supcon_weight * (
                    self.supcon(image * scale, text, labels, labels) + self.supcon(text * scale, image, labels, labels)
                )
        return losses

    def on_train_end(self) -> None:
        if self.hparams.stage == 1 and self.trainer.is_global_zero:
            path = Path(self.hparams.text_prompts or Path(self.trainer.default_root_dir) / "text_prompts.pt")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"context": self.text.context.detach().cpu()}, path)
            print(f"[farreid] stage 1 text prompts written to {path}")

    # -------------------------------------------------------------------------------------- evaluation
    def _eval_step(self, batch: dict) -> dict:
        """Embeddings of one evaluation batch and the keys the evaluator merges rows by.

        ``item`` (dataset row) defaults to ``index`` (tracklet) and ``valid`` to all True for batches that do not
        carry them (one row per tracklet, every frame decoded).
        """
        feats, weights = self.embed(batch)
        index = batch["index"]
        valid = batch.get("valid")
        return {
            "features": feats,
            "weights": weights,
            "index": index,
            "item": batch.get("item", index),
            "valid": torch.ones_like(index, dtype=torch.bool) if valid is None else valid.bool(),
        }

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch)

    # --------------------------------------------------------------------------------------- optimizer
    def trainable_groups(self) -> list[dict]:
        """Optimizer parameter groups: pretrained blocks at ``backbone_lr_mult``, everything new at 1×."""
        h = self.hparams
        bias = {key: h[key] for key in ("bias_lr_mult", "bias_weight_decay", "decay_vectors")}
        if h.stage == 1:
            return param_groups(self.text.named_parameters(prefix="text"), tag="text_", **bias)
        new = list(self.backbone.new_parameters())
        for prefix, part in (("pooling", self.pooling), ("head_cls", self.head_cls), ("head_proj", self.head_proj)):
            new.extend(part.named_parameters(prefix=prefix))
        return param_groups(
            self.backbone.pretrained_trainable_parameters(), h.backbone_lr_mult, tag="backbone_", **bias
        ) + param_groups(new, 1.0, tag="new_", **bias)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over :meth:`trainable_groups`, each group's LR scaled by its multiplier."""
        optimizer = self.optimizer_factory(self.trainable_groups())
        apply_lr_mult(optimizer)
        return optimizer

    def lr_factor(self, total: int | Callable[[], int]) -> Callable[[int], float]:
        """The configured schedule's LR factor per ``lr_interval`` unit, for a run of ``total`` units (or a function
        returning it, called lazily)."""
        h = self.hparams
        if h.lr_schedule == "multistep":
            return warmup_multistep(h.warmup_steps, h.lr_milestones or [], h.lr_gamma, h.warmup_factor)
        return warmup_cosine(h.warmup_steps, total, h.min_lr_ratio)

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        interval = self.hparams.lr_interval
        if interval == "epoch":
            if self.trainer.max_epochs is None or self.trainer.max_epochs < 1:
                raise ValueError(
                    f"model.lr_interval='epoch' needs trainer.max_epochs >= 1, got {self.trainer.max_epochs}"
                )
            total = self.trainer.max_epochs
        else:  # looked up lazily (after a resumed checkpoint is restored): see ``warmup_cosine``
            total = lambda: self.trainer.estimated_stepping_batches  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def on_train_start(self) -> None:
        """Say how long the run is: steps per epoch, total steps and the warm-up's share of them."""
        trainer = self.trainer
        per_epoch, total = trainer.num_training_batches, int(trainer.estimated_stepping_batches)
        warmup = self.hparams.warmup_steps
        # With lr_interval "epoch" the warm-up (and the schedule) counts epochs, not optimizer steps.
        unit, length = ("epochs", trainer.max_epochs) if self.hparams.lr_interval == "epoch" else ("steps", total)
        rank_zero_info(
            f"[farreid] {per_epoch} steps per epoch, {total} optimizer steps in all; warm-up {warmup} {unit} "
            f"({100 * warmup / max(length, 1):.0f}% of the run)"
        )
        if warmup >= length:
            rank_zero_warn(f"model.warmup_steps={warmup} is not shorter than the run ({length} {unit}): LR never peaks")

    # ------------------------------------------------------------------------------------- checkpoints
    def _reloadable_prefixes(self) -> list[str]:
        """State-dict prefixes of frozen weights that can be re-read from the pretrained directory."""
        prefixes = []
        if getattr(self.backbone, "pretrained", None):
            prefixes.append("backbone.")
        if self.text is not None and getattr(self.text, "pretrained", None):
            prefixes.append("text.")
        return prefixes

    def _trainable_keys(self) -> set[str]:
        """Canonical state-dict names of the parameters that train (wrapper segments removed)."""
        return {canonical_key(name) for name, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Drop frozen pretrained weights: a frozen ViT-L/14 (and text tower) then costs only its trained parts.

        Names are compared in canonical form (see :func:`canonical_key`), so wrapper prefixes that a strategy or
        ``torch.compile`` adds to parameter or state-dict names do not decide what is kept. When a trained
        parameter cannot be found among the state-dict keys at all (e.g. FSDP's flattened parameters) nothing is
        dropped: a full checkpoint is larger but loses nothing.
        """
        state = checkpoint["state_dict"]
        trainable = self._trainable_keys()
        canonical = {key: canonical_key(key) for key in state}
        unmatched = trainable - set(canonical.values())
        keep_always = ("text.context",)  # the learned prompts are trained in stage 1, frozen in stage 2
        prefixes = tuple(self._reloadable_prefixes()) if not unmatched else ()
        if unmatched:
            log.warning(
                "slim checkpoint disabled: %d trained parameters have no state-dict key (%s); saving every weight",
                len(unmatched),
                sorted(unmatched)[:3],
            )
        dropped = [
            key
            for key, name in canonical.items()
            if prefixes and name.startswith(prefixes) and name not in trainable and not name.startswith(keep_always)
        ]
        for key in dropped:
            del state[key]
        checkpoint["farreid"] = {
            "dropped_frozen_keys": len(dropped),
            "pretrained": getattr(self.backbone, "pretrained", None),
            "trainable": sorted(trainable),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Check the checkpoint against this model, then refill the frozen weights a slim checkpoint left out.

        Raises:
            ValueError: unknown keys or shape mismatches (another configuration), or a weight that trains in this
                model missing from the checkpoint (refilling it from the pretrained directory would silently
                replace fine-tuned weights with CLIP's).
        """
        # The clip geometry the model was trained/evaluated with, for farreid.tools.embed (no datamodule needed).
        self.data_hparams = dict(checkpoint.get("datamodule_hyper_parameters") or {})
        state = checkpoint["state_dict"]
        own = self.state_dict()
        unknown = sorted(set(state) - set(own))
        mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
        if unknown or mismatched:
            details = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched]
            raise ValueError(
                "checkpoint does not fit this model configuration (was it trained with another config?): "
                f"{len(unknown)} unknown keys {unknown[:5]}, {len(mismatched)} shape mismatches {details[:5]}"
            )
        present = {canonical_key(k) for k in state}
        missing_trained = sorted(self._trainable_keys() - present)
        if missing_trained:
            raise ValueError(
                f"checkpoint lacks {len(missing_trained)} weights that train in this model, e.g. "
                f"{missing_trained[:5]}: was it saved under a strategy that renames parameters, or with other "
                "trainable_blocks? Refusing to refill trained weights from the pretrained directory."
            )
        meta = checkpoint.get("farreid", {})
        if meta.get("dropped_frozen_keys"):
            pretrained = getattr(self.backbone, "pretrained", None)
            if (
                meta.get("pretrained")
                and pretrained
                and os.path.abspath(meta["pretrained"]) != os.path.abspath(pretrained)
            ):
                log.warning(
                    "checkpoint was trained on %s, frozen weights now come from %s", meta["pretrained"], pretrained
                )
            for key, value in own.items():  # frozen weights: already loaded from the pretrained directory
                state.setdefault(key, value)
