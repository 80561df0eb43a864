"""Geometry predicted from the pixels: an adapter around the ``aerialgeometry`` package (``data.geometry``).

``aerialgeometry`` is a ResNet-50 that predicts the capture altitude, horizontal distance and viewing angle of an
aerial image. farreid never downloads it or its weights: the user installs the package (an optional dependency that
farreid's extras leave out, since it is not on the index farreid installs from and ``make test-min`` installs every
extra) and gives the checkpoint as a local file. The interface farreid relies on is the one below, kept in
:func:`load_aerialgeometry` so that another release of the package is one place to change *(unconfirmed: the
package is not installable where farreid is developed; the adapter is tested with a random stand-in of it)*:

- ``loader(checkpoint: str) -> predictor`` loads the model from a local file;
- ``predictor(images) -> (altitude, distance, angle)``: ``images`` (B, 3, H, W) float32 RGB in [0, 1], each output
  (B,) in metres, metres and degrees. ``angle`` is the camera's pitch below the horizon unless
  ``angle="from_nadir"`` says it is measured from the vertical.

Use::

    --data.geometry farreid.data.geometry_predictor.PredictedGeometry --data.geometry.checkpoint /models/ag.pt

Any other loader with the same interface can be named by its dotted path (``--data.geometry.loader
mypkg.load``) or passed as a callable in Python (tests inject a tiny random stand-in this way).
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

from farreid.data.geometry import QUANTITIES, UNKNOWN, GeometrySource
from farreid.data.tracklets import Tracklet

Predictor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def load_aerialgeometry(checkpoint: str) -> Predictor:
    """The ``aerialgeometry`` model of a local checkpoint, in eval mode (the one place that knows the package's API).

    Raises:
        ImportError: the package is not installed (with how to install it).
    """
    try:
        package = importlib.import_module("aerialgeometry")
    except ImportError:
        raise ImportError(
            "data.geometry=PredictedGeometry needs the aerialgeometry package (install it from its own source), "
            "or name another loader with --data.geometry.loader"
        ) from None
    model = package.load_model(checkpoint, map_location="cpu")
    return model.eval() if isinstance(model, torch.nn.Module) else model


def _resolve(loader: str | Callable) -> Callable[[str], Predictor]:
    if callable(loader):
        return loader
    module, _, name = str(loader).rpartition(".")
    if not module:
        raise ValueError(f"data.geometry.loader must be a dotted path module.function, got {loader!r}")
    return getattr(importlib.import_module(module), name)


class PredictedGeometry(GeometrySource):
    """Per aerial tracklet, the median of a predictor's altitude, distance and pitch over a few of its frames.

    Ground tracklets stay unknown (the predictor reads aerial imagery). Values outside the documented ranges are
    counted, reported and treated as unknown like any other source's (:func:`farreid.data.geometry.normalise`).

    Args:
        checkpoint: local file of the predictor's weights (never a URL: nothing is downloaded).
        loader: dotted path of ``loader(checkpoint) -> predictor`` or the callable itself (default: the
            ``aerialgeometry`` package, :func:`load_aerialgeometry`).
        image_size: (H, W) the frames are resized to (farreid choice: 224 x 224, the usual ResNet-50 input).
        frames_per_tracklet: evenly spaced frames read per tracklet (farreid choice: 3, a median robust to one bad
            frame at a third of the cost of a tracklet's whole length).
        batch_size: images per predictor call.
        angle: what the predictor's angle is: ``pitch`` (below the horizon, DetReIDX's convention) or
            ``from_nadir`` (from the vertical; pitch = 90 - angle).
    """

    def __init__(
        self,
        checkpoint: str,
        loader: str | Callable = "farreid.data.geometry_predictor.load_aerialgeometry",
        image_size: Sequence[int] = (224, 224),
        frames_per_tracklet: int = 3,
        batch_size: int = 32,
        angle: Literal["pitch", "from_nadir"] = "pitch",
    ) -> None:
        checkpoint = str(checkpoint)
        if "://" in checkpoint:
            raise ValueError(f"data.geometry.checkpoint must be a local file, got the URL {checkpoint}")
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"data.geometry.checkpoint {checkpoint} does not exist (a local file is needed)")
        if frames_per_tracklet < 1 or batch_size < 1 or len(image_size) != 2:
            raise ValueError(
                f"PredictedGeometry: need frames_per_tracklet >= 1, batch_size >= 1 and image_size (H, W), got "
                f"{frames_per_tracklet}, {batch_size}, {image_size}"
            )
        if angle not in ("pitch", "from_nadir"):
            raise ValueError(f"PredictedGeometry.angle must be 'pitch' or 'from_nadir', got {angle!r}")
        self.checkpoint, self.loader = checkpoint, loader
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.frames_per_tracklet, self.batch_size, self.angle = frames_per_tracklet, batch_size, angle
        self._predictor: Predictor | None = None

    @property
    def predictor(self) -> Predictor:
        if self._predictor is None:  # loaded on first use: building the datamodule alone reads no weights
            self._predictor = _resolve(self.loader)(self.checkpoint)
        return self._predictor

    def _image(self, path: str) -> torch.Tensor:
        with Image.open(path) as im:
            im = im.convert("RGB").resize(self.image_size[::-1], Image.BILINEAR)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255  # (H, W, 3) -> (3, H, W)

    def _frames(self, tracklet: Tracklet) -> list[str]:
        n = len(tracklet.frames)
        picks = np.unique(np.linspace(0, n - 1, min(n, self.frames_per_tracklet)).round().astype(int))
        return [tracklet.frames[int(i)] for i in picks]

    def raw(self, tracklets: Sequence[Tracklet], reader=None) -> np.ndarray:
        out = np.full((len(tracklets), len(QUANTITIES)), math.nan)
        jobs = [
            (i, p) for i, t in enumerate(tracklets) if t.view == "aerial" and len(t.frames) for p in self._frames(t)
        ]
        rows, preds = [], []
        predictor = self.predictor if jobs else None  # a missing package fails before any frame is read
        with torch.inference_mode():
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start : start + self.batch_size]
                images = torch.stack([self._image(p) for _, p in chunk])  # (b, 3, H, W)
                altitude, distance, angle = (torch.as_tensor(v).float().reshape(-1) for v in predictor(images))
                if not altitude.shape == distance.shape == angle.shape == (len(chunk),):
                    shapes = ", ".join(str(tuple(v.shape)) for v in (altitude, distance, angle))
                    raise ValueError(
                        f"data.geometry predictor {self.loader}: expected three ({len(chunk)},) outputs for "
                        f"{len(chunk)} images, got {shapes}"
                    )
                pitch = 90.0 - angle if self.angle == "from_nadir" else angle
                preds.append(torch.stack([altitude, distance, pitch], dim=1).numpy())  # (b, 3)
                rows.extend(i for i, _ in chunk)
        if rows:
            values, rows_arr = np.concatenate(preds).astype(np.float64), np.array(rows)
            for i in np.unique(rows_arr):
                out[i] = np.median(values[rows_arr == i], axis=0)
        for i, t in enumerate(tracklets):
            if t.view != "aerial":
                out[i] = UNKNOWN
        return out
