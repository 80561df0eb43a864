"""A view of a training set whose items carry only labels: stage 1 on cached image features decodes no frame."""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from farreid.data.dataset import TrackletDataset


class LabelView(Dataset):
    """Items ``{"index", "label", "pid", "camid"}`` of a :class:`TrackletDataset`, without reading any frame.

    ``index`` is the tracklet's position in the wrapped set, i.e. the row of the cached image feature. ``labels``
    and ``tracklets`` are the wrapped set's, so identity samplers work unchanged. ``decoded`` is the set the
    cached features were decoded from (its unreadable tracklets are the ones reported).
    """

    def __init__(self, dataset: TrackletDataset, decoded: TrackletDataset | None = None) -> None:
        self.dataset = dataset
        self.decoded = decoded if decoded is not None else dataset
        self.labels = dataset.labels
        self.tracklets = dataset.tracklets

    @property
    def num_unreadable(self) -> int:
        """Unreadable tracklets met while decoding the clips the cache was computed from."""
        return self.decoded.num_unreadable

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """Item ``key``: an index, or ``(index, seed)`` as the identity sampler draws them (the seed is unused)."""
        index = key[0] if isinstance(key, tuple) else key
        tracklet = self.tracklets[index]
        return {"index": index, "label": self.labels[index], "pid": tracklet.pid, "camid": tracklet.camid}
