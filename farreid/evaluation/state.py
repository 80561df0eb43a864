"""The evaluation state of one epoch: embedding rows as a torchmetrics ``Metric``, merged per tracklet.

``EmbeddingRows`` concatenates every batch's rows (``update``) and, across processes, torchmetrics' own
synchronisation gathers them (list states with ``dist_reduce_fx="cat"``: rank-major order, uneven row counts per
rank padded and trimmed by torchmetrics). What torchmetrics does not know is farreid's: :func:`merge_rows` removes
the rows the distributed sampler repeated to pad the ranks (by dataset row ``item``), averages the rows of a
tracklet (dense evaluation) and leaves out tracklets none of whose frames could be decoded.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

# State name -> dtype it is kept in. Booleans travel as uint8: not every backend all-gathers bool tensors (gloo).
_STATES = {
    "features": torch.float32,
    "weights": torch.float32,
    "index": torch.long,
    "item": torch.long,
    "valid": torch.uint8,
    "pid": torch.long,
    "camid": torch.long,
}


@dataclasses.dataclass
class Gathered:
    """Per-tracklet evaluation inputs, in ``EvalSet`` order, on the device the features were computed on.

    Attributes:
        features: (N, F) float32 L2-normalised embeddings (rows of dropped tracklets are zero).
        weights: (N, T) frame weights of each tracklet's first row (for the attention figure).
        seen: (N,) bool, the tracklet had at least one row in this evaluation.
        readable: (N,) bool, at least one of its rows decoded a frame (``valid``).
    """

    features: torch.Tensor
    weights: torch.Tensor
    seen: torch.Tensor
    readable: torch.Tensor


class EmbeddingRows(Metric):
    """Every evaluation row of an epoch: embedding, frame weights, tracklet ``index``, dataset row ``item``,
    ``valid`` (a frame was decoded) and the row's ``pid`` / ``camid`` (-1 where the batch carries none).

    ``compute()`` returns the rows of every process as a dict of tensors (rank-major), synchronised by
    torchmetrics when a process group with several ranks exists.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(  # type: ignore[override]
        self,
        features: torch.Tensor,
        weights: torch.Tensor,
        index: torch.Tensor,
        item: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        pid: torch.Tensor | None = None,
        camid: torch.Tensor | None = None,
    ) -> None:
        """Add one batch: (B, F) features, (B, T) weights, (B,) index; ``item`` defaults to ``index`` (one row per
        tracklet), ``valid`` to all True, ``pid``/``camid`` to -1."""
        missing = torch.full_like(index, -1)
        values = {
            "features": features,
            "weights": weights,
            "index": index,
            "item": index if item is None else item,
            "valid": torch.ones_like(index, dtype=torch.bool) if valid is None else valid,
            "pid": missing if pid is None else pid,
            "camid": missing if camid is None else camid,
        }
        for name, dtype in _STATES.items():
            getattr(self, name).append(values[name].detach().to(device=self.device, dtype=dtype))

    def compute(self) -> dict[str, torch.Tensor]:
        # Synchronised, a list state arrives as one concatenated tensor; locally it is the list of batches.
        if self.num_rows == 0:
            raise RuntimeError("EmbeddingRows.compute() before any update: no evaluation batch was recorded")
        rows = {name: dim_zero_cat(getattr(self, name)) for name in _STATES}
        rows["valid"] = rows["valid"].bool()
        return rows

    @property
    def num_rows(self) -> int:
        """Rows recorded by this process so far (before any synchronisation)."""
        index = self.index
        return sum(len(part) for part in index) if isinstance(index, list) else len(index)


def merge_rows(
    features: torch.Tensor,
    weights: torch.Tensor,
    index: torch.Tensor,
    item: torch.Tensor,
    valid: torch.Tensor,
    num_tracklets: int,
) -> Gathered:
    """De-duplicate gathered rows by ``item``, average the valid rows of each tracklet ``index`` and re-normalise.

    Args:
        features: (R, F) embeddings of the gathered rows; weights: (R, T) their frame weights.
        index: (R,) tracklet index in the eval set; item: (R,) row of the eval dataset (one tracklet may have
            several rows in dense evaluation; DistributedSampler repeats some rows to pad the ranks).
        valid: (R,) bool, False when no frame of the row's tracklet could be decoded.
        num_tracklets: N, the tracklets of the eval set.
    """
    index, item, valid = index.long(), item.long(), valid.bool()
    first = torch.full((int(item.max()) + 1,), len(item), dtype=torch.long, device=item.device)
    first.scatter_reduce_(0, item, torch.arange(len(item), device=item.device), reduce="amin")
    keep = first[first < len(item)]  # one position per distinct item
    features, weights, index, valid = features[keep].float(), weights[keep].float(), index[keep], valid[keep]
    if bool((index < 0).any() or (index >= num_tracklets).any()):
        raise RuntimeError(f"evaluation rows carry tracklet indices outside [0, {num_tracklets})")
    seen = torch.zeros(num_tracklets, dtype=torch.bool, device=index.device)
    seen[index] = True
    # An unreadable row's features are whatever the model made of blank frames: they never enter the sum (a
    # where, not a product with 0, since 0 * NaN is NaN). A non-finite *valid* row stays in and is reported.
    rows = torch.where(valid[:, None], features, torch.zeros_like(features))  # (R', F)
    summed = features.new_zeros(num_tracklets, features.shape[1]).index_add_(0, index, rows)
    counts = features.new_zeros(num_tracklets).index_add_(0, index, valid.to(features.dtype))
    readable = counts > 0
    pooled = F.normalize(summed, dim=1)  # the mean of the rows, re-normalised
    first_row = torch.full((num_tracklets,), len(index), dtype=torch.long, device=index.device)
    first_row.scatter_reduce_(0, index, torch.arange(len(index), device=index.device), reduce="amin")
    frame_weights = weights.new_zeros(num_tracklets, weights.shape[1])
    frame_weights[seen] = weights[first_row[seen]]
    return Gathered(pooled * readable[:, None], frame_weights, seen, readable)


def merged(rows: dict[str, torch.Tensor], num_tracklets: int) -> Gathered:
    """:func:`merge_rows` of the rows ``EmbeddingRows.compute()`` returned."""
    return merge_rows(rows["features"], rows["weights"], rows["index"], rows["item"], rows["valid"], num_tracklets)
