"""Per-tracklet capture geometry (altitude, horizontal distance, pitch), normalised, with what is known.

The geometry-aware model (:mod:`farreid.models.geometry`) reads each tracklet's three values scaled to [0, 1] by
the documented ranges below, and a known-mask. A value is unknown when the dataset does not carry it (ground views,
MARS, LS-VID, ...); the model then uses a learned "unknown" embedding, never a 0 that would mean 0 m.

Where the values come from is a :class:`GeometrySource` (``data.geometry``): the frame names (the default,
:class:`FileNameGeometry`), a CSV sidecar (:class:`CSVGeometry`) or a predictor
(:class:`farreid.data.geometry_predictor.PredictedGeometry`). A value outside its range is counted, reported with
the first tracklet that has one, and treated as unknown rather than passed on.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from farreid.data.tracklets import Tracklet

QUANTITIES = ("altitude", "distance", "pitch")
UNITS = ("m", "m", "deg")
# Inclusive ranges: DetReIDX flies at 5.8-120 m altitude, up to 120 m horizontal distance, pitch 30/60/90 degrees
# (shared/DOMAIN.md section 1, from the DetReIDX paper); AG-VPReID reports flights of 15-120 m. The upper bound 150 m
# is (farreid choice: a margin above both benchmarks' 120 m, so a slightly higher flight is still a known value);
# pitch is the camera's depression below the horizon, 0 (horizontal) to 90 (nadir).
RANGES = {"altitude": (0.0, 150.0), "distance": (0.0, 150.0), "pitch": (0.0, 90.0)}
UNKNOWN = (math.nan, math.nan, math.nan)


def describe_ranges() -> str:
    return ", ".join(f"{q} {RANGES[q][0]:g}-{RANGES[q][1]:g} {u}" for q, u in zip(QUANTITIES, UNITS, strict=True))


@dataclass
class Geometry:
    """Geometry of N tracklets.

    Attributes:
        values: (N, 3) float32 altitude, distance, pitch scaled to [0, 1] by :data:`RANGES` (0 where unknown).
        known: (N, 3) bool, True where the value is known and in range.
        out_of_range: values found outside :data:`RANGES` (treated as unknown, reported).
    """

    values: np.ndarray
    known: np.ndarray
    out_of_range: int = 0

    def __len__(self) -> int:
        return len(self.values)


def normalise(raw: np.ndarray, names: Sequence[str], where: str) -> Geometry:
    """Raw metres/degrees (N, 3), NaN = unknown, -> :class:`Geometry`; out-of-range values counted and warned.

    Args:
        raw: (N, 3) altitude (m), horizontal distance (m), pitch (degrees); NaN where unknown.
        names: per row, the file or tracklet named in the report of an out-of-range value.
        where: what the rows are (a split, a CSV file), for the report.
    """
    raw = np.asarray(raw, dtype=np.float64).reshape(-1, len(QUANTITIES))
    low = np.array([RANGES[q][0] for q in QUANTITIES])
    high = np.array([RANGES[q][1] for q in QUANTITIES])
    present = ~np.isnan(raw)
    inside = present & (raw >= low) & (raw <= high)
    bad = present & ~inside
    count = int(bad.sum())
    if count:
        row, col = (int(i) for i in np.argwhere(bad)[0])
        warnings.warn(
            f"{where}: {count} geometry values outside the documented ranges ({describe_ranges()}) treated as unknown; "
            f"first: {names[row]} {QUANTITIES[col]}={raw[row, col]:g}",
            stacklevel=2,
        )
    values = np.where(inside, (raw - low) / (high - low), 0.0).astype(np.float32)
    return Geometry(values=values, known=inside, out_of_range=count)


def name_geometry(tracklet: Tracklet) -> tuple[float, float, float]:
    """DetReIDX's frame-name geometry of a tracklet: aerial -> (altitude, distance, pitch); ground -> unknown."""
    if tracklet.view != "aerial":
        return UNKNOWN
    return (tracklet.altitude, tracklet.distance, tracklet.angle)


class GeometrySource(ABC):
    """Where the tracklets' geometry comes from (``data.geometry``); subclasses implement :meth:`raw`."""

    @abstractmethod
    def raw(self, tracklets: Sequence[Tracklet], reader=None) -> np.ndarray:
        """(N, 3) altitude (m), distance (m), pitch (deg) of the tracklets; NaN where unknown.

        Args:
            tracklets: every tracklet the datamodule will read (training and evaluation, one call).
            reader: the dataset reader (a :class:`~farreid.data.datasets.base.VideoReIDDataset`), or None.
        """
        ...

    def geometry(self, tracklets: Sequence[Tracklet], reader=None, where: str = "geometry") -> Geometry:
        """The normalised :class:`Geometry` of ``tracklets`` (out-of-range values reported, then unknown)."""
        raw = self.raw(tracklets, reader)
        if raw.shape != (len(tracklets), len(QUANTITIES)):
            raise ValueError(f"{type(self).__name__}.raw returned shape {raw.shape}, expected ({len(tracklets)}, 3)")
        names = [t.frames[0] if len(t.frames) else t.name for t in tracklets]
        return normalise(raw, names, where)


class FileNameGeometry(GeometrySource):
    """Geometry parsed from the frame names: the reader's ``name_geometry`` (DetReIDX: altitude, distance, pitch of
    aerial frames; AG-VPReID: the altitude when ``altitude_unit_m`` is set; other datasets: unknown)."""

    def raw(self, tracklets: Sequence[Tracklet], reader=None) -> np.ndarray:
        parse = name_geometry if reader is None else reader.name_geometry
        return np.array([parse(t) for t in tracklets], dtype=np.float64).reshape(-1, len(QUANTITIES))


class CSVGeometry(GeometrySource):
    """Geometry from a CSV sidecar the user supplies: columns ``tracklet,altitude,distance,pitch`` (metres, metres,
    degrees; an empty cell is unknown). Every tracklet of the dataset must have one row, and every row must name a
    tracklet of the dataset (by folder name).

    Args:
        path: the CSV file.
    """

    def __init__(self, path: str) -> None:
        self.path = str(path)

    def _rows(self) -> dict[str, tuple[float, float, float]]:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"data.geometry CSV {self.path} does not exist")
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            columns = ("tracklet", *QUANTITIES)
            if reader.fieldnames is None or not set(columns) <= set(reader.fieldnames):
                raise ValueError(f"{self.path}: expected the header {','.join(columns)}, got {reader.fieldnames}")
            rows: dict[str, tuple[float, float, float]] = {}
            for line, row in enumerate(reader, start=2):
                name = row["tracklet"].strip()
                if name in rows:
                    raise ValueError(f"{self.path} line {line}: tracklet {name!r} is listed twice")
                try:
                    rows[name] = tuple(float(row[q]) if row[q].strip() else math.nan for q in QUANTITIES)
                except ValueError as err:
                    raise ValueError(f"{self.path} line {line}: expected numbers or empty cells ({err})") from None
        return rows

    def raw(self, tracklets: Sequence[Tracklet], reader=None) -> np.ndarray:
        rows = self._rows()
        names = {t.name for t in tracklets}
        missing = sorted(names - rows.keys())
        if missing:
            raise ValueError(
                f"{self.path}: no row for {len(missing)} tracklets of the dataset, e.g. {', '.join(missing[:3])}"
            )
        extra = sorted(rows.keys() - names)
        if extra:
            raise ValueError(
                f"{self.path}: {len(extra)} rows name tracklets not in the dataset, e.g. {', '.join(extra[:3])}"
            )
        return np.array([rows[t.name] for t in tracklets], dtype=np.float64).reshape(-1, len(QUANTITIES))

    def geometry(self, tracklets: Sequence[Tracklet], reader=None, where: str = "geometry") -> Geometry:
        raw = self.raw(tracklets, reader)
        return normalise(raw, [f"tracklet {t.name}" for t in tracklets], self.path)
