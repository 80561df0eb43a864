"""The training objectives: one small class per weighted loss term, chosen and weighted in the config.

``ReIDModule(objectives={name: Objective, ...})`` sums the terms of its stage and logs each as ``train/<name>``.
A term reads what it needs from :class:`LossInputs` (the step's pooled features, head logits, the identities' text
features) and returns its weighted loss, or None when it has nothing to add (no text bank, a zero weight).
Adding a loss is one class here (or anywhere importable) and one config line::

    farreid fit --config configs/vitl14.yaml --model.objectives.center=mypackage.CenterLoss

The stage-2 terms are the baseline's (VSLA-CLIP / CLIP-ReID, DOMAIN.md §4): label-smoothed identity CE on both
BNNeck heads, batch-hard cosine triplets on the pooled CLS and projection (before the BN neck) and on the
intermediate CLS, the image->text CE against every identity's text feature, and the two SupCon terms. Stage 1
(``stage = 1``) trains the text prompts with image<->text SupCon on frozen image features.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from farreid.losses import BatchHardTripletLoss, SupConLoss, scaled_logits

ImageTextLogits = Literal["cosine", "raw"]


@dataclasses.dataclass
class LossInputs:
    """What one training step offers the objectives (float32 unless noted).

    Attributes:
        labels: (B,) training identity labels.
        cls, proj: (B, D) pooled CLS and (B, P) pooled projection, before the BN necks (stage 2).
        mid: (B, D) pooled intermediate CLS, or None without ``backbone.mid_block``.
        logits_cls, logits_proj: (B, C) identity logits of the two BNNeck heads (stage 2).
        text_bank: (C, P) every identity's text feature, unnormalised; empty without a text stage.
        image, text: (B, P) L2-normalised image features and text features of the batch's identities (stage 1).
    """

    labels: torch.Tensor
    cls: torch.Tensor | None = None
    proj: torch.Tensor | None = None
    mid: torch.Tensor | None = None
    logits_cls: torch.Tensor | None = None
    logits_proj: torch.Tensor | None = None
    text_bank: torch.Tensor | None = None
    image: torch.Tensor | None = None
    text: torch.Tensor | None = None


class Objective(nn.Module, abc.ABC):
    """One weighted loss term. Subclasses set ``stage`` (1: text prompts, 2: image side) and implement ``forward``.

    Args:
        weight: the term's weight in the summed loss; 0 switches it off.
    """

    stage: ClassVar[int] = 2

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    @abc.abstractmethod
    def forward(self, inputs: LossInputs) -> torch.Tensor | None:
        """The weighted loss of this step, or None when the term does not apply."""


class IdentityLoss(Objective):
    """Label-smoothed cross-entropy of both BNNeck heads' identity logits, summed, times ``weight``."""

    def __init__(self, weight: float = 1.0, label_smoothing: float = 0.1) -> None:
        super().__init__(weight)
        self.label_smoothing = label_smoothing

    def forward(self, inputs: LossInputs) -> torch.Tensor | None:
        ce = sum(
            F.cross_entropy(logits.float(), inputs.labels, label_smoothing=self.label_smoothing)
            for logits in (inputs.logits_cls, inputs.logits_proj)
        )
        return self.weight * ce


class TripletLoss(Objective):
    """Batch-hard cosine triplet on the pooled CLS and on the pooled projection (before the BN necks), summed."""

    def __init__(self, weight: float = 1.0, margin: float = 0.3) -> None:
        super().__init__(weight)
        self.loss = BatchHardTripletLoss(margin=margin, metric="cosine")

    def forward(self, inputs: LossInputs) -> torch.Tensor | None:
        return self.weight * (
            self.loss(inputs.cls.float(), inputs.labels) + self.loss(inputs.proj.float(), inputs.labels)
        )


class MidTripletLoss(TripletLoss):
    """Batch-hard cosine triplet on the pooled intermediate CLS (``backbone.mid_block``); None without it."""

    def __init__(self, weight: float = 0.5, margin: float = 0.3) -> None:
        super().__init__(weight, margin)

    def forward(self, inputs: LossInputs) -> torch.Tensor | None:
        if inputs.mid is None or self.weight <= 0:
            return None
        return self.weight * self.loss(inputs.mid.float(), inputs.labels)


class _ImageText(Objective):
    """Shared by the stage-2 image<->text terms: the logits convention and the text bank."""

    def __init__(self, weight: float = 1.0, logits: ImageTextLogits = "cosine", logit_scale: float = 100.0) -> None:
        super().__init__(weight)
        self.logits, self.logit_scale = logits, logit_scale

    def image_text(self, inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(B, P) image features, (C, P) text bank and the scale of their dot products; None without a text bank.

        "cosine": L2-normalised features x ``logit_scale``; "raw": the plain dot product of the unnormalised
        projection and text features (the baseline, CLIP-ReID).
        """
        bank = inputs.text_bank
        if self.weight <= 0 or bank is None or bank.numel() == 0:
            return None
        if self.logits == "raw":
            return inputs.proj.float(), bank, 1.0
        return F.normalize(inputs.proj.float(), dim=1), F.normalize(bank, dim=1), self.logit_scale


class ImageTextLoss(_ImageText):
    """Label-smoothed CE of the pooled projection against every identity's text feature (image -> text)."""

    def __init__(
        self,
        weight: float = 1.0,
        label_smoothing: float = 0.1,
        logits: ImageTextLogits = "cosine",
        logit_scale: float = 100.0,
    ) -> None:
        super().__init__(weight, logits, logit_scale)
        self.label_smoothing = label_smoothing

    def forward(self, inputs: LossInputs) -> torch.Tensor | None:
        found = self.image_text(inputs)
        if found is None:
            return None
        image, bank, scale = found
        logits = scaled_logits(image, bank, scale)  # (B, P) x (P, C) -> (B, C), float32 under autocast
        return self.weight * F.cross_entropy(logits, inputs.labels, label_smoothing=self.label_smoothing)


class ImageTextSupCon(_ImageText):
    """SupCon image->text plus text->image against the batch's own identities' text features (stage 2)."""

    def __init__(self, weight: float = 1.0, logits: ImageTextLogits = "cosine", logit_scale: float = 100.0) -> None:
        super().__init__(weight, logits, logit_scale)
        self.supcon = SupConLoss()

    def forward(self, inputs: LossInputs) -> torch.Tensor | None:
        found = self.image_text(inputs)
        if found is None:
            return None
        image, bank, scale = found
        labels = inputs.labels
        text = bank[labels]  # (B, P): each clip's own identity text, as the baseline recomputes per batch
        return self.weight * (
            self.supcon(image * scale, text, labels, labels) + self.supcon(text * scale, image, labels, labels)
        )


class PromptSupCon(Objective):
    """Stage 1: SupCon between the frozen image features and the learned text features of the batch's identities.

    Args:
        weight: the term's weight.
        direction: "i2t" (images as anchors) or "t2i" (texts as anchors).
        logit_scale: multiplier of the cosine similarities (CLIP's is 100).
    """

    stage: ClassVar[int] = 1

    def __init__(self, weight: float = 1.0, direction: Literal["i2t", "t2i"] = "i2t", logit_scale: float = 100.0):
        super().__init__(weight)
        self.direction, self.logit_scale = direction, logit_scale
        self.supcon = SupConLoss()

    def forward(self, inputs: LossInputs) -> torch.Tensor | None:
        anchor, other = (inputs.image, inputs.text) if self.direction == "i2t" else (inputs.text, inputs.image)
        return self.weight * self.supcon(anchor * self.logit_scale, other, inputs.labels, inputs.labels)


def default_objectives(stage: int) -> dict[str, Objective]:
    """The terms of a stage when the config names none (the weights farreid uses without a recipe)."""
    if stage == 1:
        return {"i2t_supcon": PromptSupCon(direction="i2t"), "t2i_supcon": PromptSupCon(direction="t2i")}
    return {
        "id": IdentityLoss(),
        "triplet": TripletLoss(),
        "mid_triplet": MidTripletLoss(),
        "i2t": ImageTextLoss(),
        "supcon": ImageTextSupCon(weight=0.0),
    }
