"""The LightningModule: CLIP vision backbone -> temporal pooling -> BNNeck heads; the objectives; optimizer groups.

Two stages (DOMAIN.md §4, CLIP-ReID):
- ``stage: 1`` trains only the per-identity text context vectors of :class:`TextPromptLearner` against image
  features of the frozen backbone and writes them to ``text_prompts`` (:mod:`farreid.text_stage`);
- ``stage: 2`` (default) reads them back frozen and trains the image side. Without ``text`` the module is a plain
  image model. The loss terms of each stage are :mod:`farreid.objectives` classes, chosen in the config.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins import hparams_mixin
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from farreid import checkpointing, text_stage
from farreid.models.backbone import CLIPVisionBackbone
from farreid.models.heads import BNNeck
from farreid.models.pooling import TemporalAttentionPooling, TemporalPooling
from farreid.models.text import TextPromptLearner
from farreid.objectives import LossInputs, Objective, default_objectives
from farreid.optim import WarmupCosine, apply_lr_mult, reid_param_groups, schedule_summary

# The parts a Python caller passes as objects (never hyperparameters); LightningCLI passes their configs instead.
_PARTS = ["backbone", "pooling", "text", "objectives", "optimizer", "lr_scheduler"]


def clip_inputs(batch: dict) -> tuple:
    """(frames, camids, mask, geometry, geometry_known) of a batch; the optional ones None when absent."""
    return tuple(batch.get(k) for k in ("frames", "camid", "mask", "geometry", "geometry_known"))


class ReIDModule(L.LightningModule):
    """Video person ReID on CLIP: per-frame backbone features, temporal pooling, BNNeck heads.

    Args:
        backbone: the vision tower (adapters, prompts and selective fine-tuning are configured on it).
        pooling: builds the temporal pooling (a :class:`~farreid.models.pooling.TemporalPooling`) from the
            embedding width; its frame weights also pool the projection and the intermediate CLS.
        num_classes: training identities; linked from ``data.num_classes`` by the CLI.
        text: builds the text prompt learner from ``num_classes``; None trains without text supervision.
        stage: 1 = learn the text prompts on the frozen image side, 2 = train the image side.
        text_prompts: file the stage-1 context vectors are written to and stage 2 reads them from.
        objectives: name -> loss term of this stage, each logged as ``train/<name>`` (see
            :mod:`farreid.objectives`); None: :func:`~farreid.objectives.default_objectives` of the stage.
        optimizer: builds the optimizer from parameter groups (base LR, weight decay in its init args).
        lr_scheduler: builds the LR schedule from the optimizer (:class:`~farreid.optim.WarmupCosine`,
            :class:`~farreid.optim.WarmupMultiStep`); it is given the run's length as ``total_steps``.
        lr_interval: "step" or "epoch": when the LR moves, and the unit of the schedule's steps.
        backbone_lr_mult: LR multiplier of the pretrained blocks that train (selective fine-tuning).
        bias_lr_mult, bias_weight_decay, decay_vectors: bias LR factor, bias weight decay (None = 0) and
            whether norm weights / prompts / other vectors decay; see :func:`farreid.optim.param_groups`.
        flip_tta: average the embedding of each clip with its horizontal flip at test time.
        eval_feature: "bn" (after the BNNeck) or "raw" (before) for the retrieval embedding.
        stage1_features: stage 1's image features: "cached" (once, before the first step, from un-augmented
            clips, as CLIP-ReID) or "online" (the frozen image side on every augmented clip at every step).
    """

    def __init__(
        self,
        backbone: CLIPVisionBackbone,
        pooling: Callable[[int], TemporalPooling] = TemporalAttentionPooling,
        num_classes: int = 0,
        text: Callable[[int], TextPromptLearner] | None = None,
        stage: Literal[1, 2] = 2,
        text_prompts: str | None = None,
        objectives: dict[str, Objective] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable = WarmupCosine,
        lr_interval: Literal["step", "epoch"] = "step",
        backbone_lr_mult: float = 0.1,
        bias_lr_mult: float = 1.0,
        bias_weight_decay: float | None = None,
        decay_vectors: bool = False,
        flip_tta: bool = True,
        eval_feature: Literal["bn", "raw"] = "bn",
        stage1_features: Literal["cached", "online"] = "cached",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1 (linked from data.num_classes), got {num_classes}")
        if stage == 1 and text is None:
            raise ValueError("model.stage=1 learns text prompts: set model.text (a TextPromptLearner)")
        objectives = default_objectives(stage) if objectives is None else objectives
        wrong = [name for name, term in objectives.items() if term.stage != stage]
        if wrong or not objectives:
            raise ValueError(f"model.objectives {wrong or '{}'}: expected the loss terms of stage {stage}")
        self.hparams_num_classes = num_classes
        self._save_hyperparameters()
        self.backbone = backbone
        # A backbone reads geometry only when it says so (`uses_geometry`): one written to the
        # forward_features(frames, camids) contract keeps working.
        self._geometry_inputs = bool(getattr(backbone, "uses_geometry", False))
        self.pooling = pooling(backbone.embed_dim)
        self.head_cls = BNNeck(backbone.embed_dim, num_classes)
        self.head_proj = BNNeck(backbone.proj_dim, num_classes)
        self.text = text(num_classes) if text is not None else None
        self.objectives = nn.ModuleDict(objectives)
        self.optimizer_factory, self.scheduler_factory = optimizer, lr_scheduler
        self.register_buffer("text_bank", torch.empty(0), persistent=False)  # (C, P) stage 2
        self.register_buffer("image_bank", torch.empty(0), persistent=False)  # (N, P) stage 1, cached
        if stage == 1:  # only the text context vectors learn in stage 1
            for part in (self.backbone, self.pooling, self.head_cls, self.head_proj):
                part.requires_grad_(False)
        elif self.text is not None:
            self.text.requires_grad_(False)

    def _save_hyperparameters(self) -> None:
        """Save the init arguments; the parts only as configs, never as objects.

        Built by LightningCLI, the saved values are each part's config, so ``ReIDModule.load_from_checkpoint(path)``
        rebuilds the whole model; built in Python, the parts are objects: not hyperparameters, never deep-copied.
        Lightning hands the CLI's config over in ``hparams_mixin._given_hyperparameters`` (private:
        tests/test_objectives.py fails by name if a Lightning release renames it).
        """
        given = getattr(hparams_mixin, "_given_hyperparameters", None)
        from_config = given is not None and given.get() is not None
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"] if from_config else _PARTS)
        # The classifier width as linked from the data (the CLI's config may hold the value before the link). Not
        # in the logged copy: loggers merge it with the datamodule's, whose num_classes is only an override.
        self._hparams["num_classes"] = self.hparams_num_classes
        self._hparams_initial.pop("num_classes", None)

    # ------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        frames: torch.Tensor,
        camids: torch.Tensor,
        mask: torch.Tensor | None = None,
        geometry: torch.Tensor | None = None,
        geometry_known: torch.Tensor | None = None,
    ) -> dict:
        """Pooled clip features.

        Args:
            frames: (B, T, 3, H, W) normalised frames. camids: (B,) 0 ground, 1/2 UAV session.
            mask: (B, T) True on real frames, False on padding repeats.
            geometry, geometry_known: (B, 3) normalised altitude, distance, pitch and their known-mask (None: all
                unknown); read only by a backbone with a geometry mechanism.

        Returns:
            dict with ``cls`` (B, D), ``proj`` (B, P), ``mid`` (B, D) or None, ``weights`` (B, T).
        """
        geometry_inputs = (geometry, geometry_known) if self._geometry_inputs else ()
        out = self.backbone.forward_features(frames, camids, *geometry_inputs)
        cls, weights = self.pooling(out.cls, mask)
        w = weights.unsqueeze(-1).to(out.proj.dtype)  # (B, T) -> (B, T, 1)
        proj = (w * out.proj).sum(1)
        mid = (w * out.mid_cls).sum(1) if out.mid_cls is not None else None
        return {"cls": cls, "proj": proj, "mid": mid, "weights": weights}

    def _embed_once(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        out = self(*clip_inputs(batch))
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
        data = getattr(getattr(self.trainer, "datamodule", None), "hparams", {})
        if stage == "fit" and "image_size" in data and "num_frames" in data:
            height, width = data["image_size"]
            frames = torch.zeros(1, data["num_frames"], 3, height, width)  # (B=1, T, 3, H, W)
            self.example_input_array = (frames, torch.zeros(1, dtype=torch.long))

    def on_fit_start(self) -> None:
        if self.hparams.stage == 1:
            if self.hparams.stage1_features == "cached":
                loader = self.trainer.datamodule.cached_feature_loader()
                self.image_bank = text_stage.cache_image_features(self, loader)
        elif self.text is not None:
            self.text_bank = text_stage.load_prompts(self.text, self.hparams.text_prompts)

    def loss_inputs(self, batch: dict) -> LossInputs:
        """What the objectives of this stage read from one training batch."""
        labels = batch["label"]
        if self.hparams.stage == 1:
            if self.image_bank.numel() > 0:
                image = self.image_bank[batch["index"]]  # cached, already normalised
            elif "frames" not in batch:
                raise RuntimeError("stage 1: this batch has no frames and no image features were cached")
            else:
                with torch.no_grad():
                    out = self(*clip_inputs(batch))
                    image = F.normalize(out["proj"].float(), dim=1)
            return LossInputs(labels, image=image, text=F.normalize(self.text(labels).float(), dim=1))
        out = self(*clip_inputs(batch))
        _, logits_cls = self.head_cls(out["cls"])
        _, logits_proj = self.head_proj(out["proj"])
        bank = self.text_bank if self.text is not None else None
        return LossInputs(labels, out["cls"], out["proj"], out["mid"], logits_cls, logits_proj, text_bank=bank)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Each objective's weighted loss on one training batch (the terms that apply), in config order."""
        inputs = self.loss_inputs(batch)
        losses = {name: term(inputs) for name, term in self.objectives.items()}
        return {name: value for name, value in losses.items() if value is not None}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        loss = sum(losses.values())
        self._check_finite(loss, losses, batch_idx)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, on_step=True, on_epoch=False)
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _check_finite(self, loss: torch.Tensor, losses: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Raise on every rank when the loss of any rank is non-finite.

        The flag is all-gathered (one tiny collective and one host sync per step, before the backward pass), so
        every rank raises at the same step: a rank raising alone would leave the others in the gradient
        all-reduce until the NCCL timeout (30 min).
        """
        bad = (~torch.isfinite(loss.detach())).to(torch.int32).reshape(1)  # (1,)
        world = self.trainer.world_size if text_stage.attached_trainer(self) else 1
        if world > 1:
            bad = self.all_gather(bad).flatten()  # (world,)
        if not bool(bad.any()):
            return
        where = f"on rank(s) {bad.nonzero().flatten().tolist()} " if world > 1 else ""
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        raise FloatingPointError(
            f"non-finite training loss {where}at global step {self.global_step} (epoch {self.current_epoch}, "
            f"batch {batch_idx}); this rank's terms: {parts}. Lower the learning rate or check the input frames."
        )

    def on_train_end(self) -> None:
        if self.hparams.stage == 1 and self.trainer.is_global_zero:
            default = Path(self.trainer.default_root_dir) / "text_prompts.pt"
            text_stage.save_prompts(self.text, self.hparams.text_prompts or default)

    # -------------------------------------------------------------------------------------- evaluation
    def _eval_step(self, batch: dict) -> dict:
        """Embeddings of one evaluation batch and the keys the evaluator merges rows by (``item``: dataset row,
        defaults to ``index``; ``valid``: defaults to all True)."""
        feats, weights = self.embed(batch)
        index, valid = batch["index"], batch.get("valid")
        valid = torch.ones_like(index, dtype=torch.bool) if valid is None else valid.bool()
        return {"features": feats, "weights": weights, "index": index, "item": batch.get("item", index), "valid": valid}

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return self._eval_step(batch)

    # --------------------------------------------------------------------------------------- optimizer
    def trainable_groups(self) -> list[dict]:
        """Optimizer parameter groups: pretrained blocks at ``backbone_lr_mult``, everything new at 1×."""
        return reid_param_groups(self)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer over :meth:`trainable_groups`, each group's LR scaled by its multiplier."""
        optimizer = self.optimizer_factory(self.trainable_groups())
        apply_lr_mult(optimizer)
        return optimizer

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        interval = self.hparams.lr_interval
        if interval == "epoch":
            if self.trainer.max_epochs is None or self.trainer.max_epochs < 1:
                raise ValueError(
                    f"model.lr_interval='epoch' needs trainer.max_epochs >= 1, got {self.trainer.max_epochs}"
                )
            total = self.trainer.max_epochs
        else:  # looked up lazily (after a resumed checkpoint is restored): see ``farreid.optim.warmup_cosine``
            total = lambda: self.trainer.estimated_stepping_batches  # noqa: E731
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def on_train_start(self) -> None:
        """Say how long the run is: steps per epoch, total steps and the warm-up's share of them."""
        info, warning = schedule_summary(self.trainer, self.hparams.lr_interval)
        rank_zero_info(info)
        if warning:
            rank_zero_warn(warning)

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Drop frozen pretrained weights: a frozen ViT-L/14 (and text tower) costs only its trained parts."""
        checkpointing.slim(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Check the checkpoint against this model, then refill the frozen weights a slim checkpoint left out."""
        # The clip geometry the model was trained/evaluated with, for farreid.tools.embed (no datamodule needed).
        self.data_hparams = dict(checkpoint.get("datamodule_hyper_parameters") or {})
        checkpointing.check_and_refill(self, checkpoint)
