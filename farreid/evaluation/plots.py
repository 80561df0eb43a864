"""Evaluation figures as PNG files: CMC curves, ranked lists, temporal attention and metadata breakdowns.

Figures are drawn on `matplotlib.figure.Figure` objects rendered by the Agg canvas, never through pyplot, so
no global backend is switched and nothing needs a display. Every function writes one PNG and returns its path.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from farreid.evaluation.frames import FrameReader

# Height x width of one frame thumbnail in the strips, pixels (the 2:1 aspect of person crops).
THUMB_SIZE = (96, 48)
_CORRECT, _WRONG = "#2ca02c", "#d62728"


def _save(figure: Figure, path: str | Path) -> Path:
    """Renders `figure` with the Agg canvas to `path` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=100)
    return path


def _strip(frames: Sequence[str], count: int | None, reader: FrameReader | None = None) -> np.ndarray:
    """Evenly spaced frames side by side: (H, count * W, 3) uint8 (all frames when count is None); a frame that
    cannot be read is drawn as the reader's placeholder and counted there."""
    if not frames:
        raise ValueError("a tracklet to draw has no frames")
    if count is None or count >= len(frames):
        chosen = list(frames)
    else:
        chosen = [frames[i] for i in np.linspace(0, len(frames) - 1, count).round().astype(int)]
    reader = reader or FrameReader(THUMB_SIZE)
    return reader.strip(chosen)  # count x (H, W, 3) -> (H, count * W, 3)


def _frame_axes(axes, image: np.ndarray, colour: str | None = None, title: str | None = None) -> None:
    """Shows `image` without ticks; a coloured, thick frame when `colour` is given."""
    axes.imshow(image)
    axes.set_xticks([])
    axes.set_yticks([])
    if title:
        axes.set_title(title, fontsize=7)
    for spine in axes.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_edgecolor(colour)
            spine.set_linewidth(4)


def plot_cmc(curves: dict[str, np.ndarray], path: str | Path) -> Path:
    """CMC curves, one line per name.

    Args:
        curves: name -> (R,) matching rate at ranks 1..R, fractions in [0, 1].
        path: output PNG.
    """
    figure = Figure(figsize=(5, 4))
    axes = figure.add_subplot()
    for name, curve in curves.items():
        curve = np.asarray(curve, dtype=float)
        axes.plot(np.arange(1, curve.size + 1), 100.0 * curve, label=name)
    axes.set_xlabel("rank")
    axes.set_ylabel("matching rate (%)")
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return _save(figure, path)


def plot_ranked_lists(
    query_frames: list[list[str]],
    gallery_frames: list[list[list[str]]],
    correct: np.ndarray,
    path: str | Path,
    frames_per_tracklet: int = 4,
    query_labels: Sequence[str] | None = None,
    gallery_labels: Sequence[Sequence[str]] | None = None,
    title: str | None = None,
    reader: FrameReader | None = None,
) -> Path:
    """Each query tracklet followed by its top-ranked gallery tracklets, framed green (correct) or red (wrong).

    Args:
        query_frames: Q lists of frame paths.
        gallery_frames: per query, the ranked gallery tracklets (up to 10), each a list of frame paths.
        correct: (Q, R) bool, whether the r-th ranked gallery tracklet has the query's identity.
        path: output PNG.
        frames_per_tracklet: evenly spaced frames shown per tracklet.
        query_labels: per query, a caption (e.g. its AP, ID, camera, altitude, distance); "query" if None.
        gallery_labels: per query and rank, a caption (e.g. distance, ID, camera); "rank r" if None.
        title: figure title.
        reader: decodes the frames (unreadable ones become counted placeholders); a fresh one if None.
    """
    correct = np.asarray(correct, dtype=bool)
    num_query = len(query_frames)
    if len(gallery_frames) != num_query or correct.shape[0] != num_query:
        raise ValueError(f"{num_query} queries but {len(gallery_frames)} ranked lists and correct {correct.shape}")
    if query_labels is not None and len(query_labels) != num_query:
        raise ValueError(f"{num_query} queries but {len(query_labels)} query labels")
    if gallery_labels is not None and [len(row) for row in gallery_labels] != [len(row) for row in gallery_frames]:
        raise ValueError("gallery_labels must have one caption per ranked gallery tracklet")
    columns = 1 + max((len(row) for row in gallery_frames), default=0)
    figure = Figure(figsize=(1.1 * frames_per_tracklet * columns / 2, 2.0 * num_query + 0.5))
    grid = figure.subplots(num_query, columns, squeeze=False)
    for q in range(num_query):
        caption = query_labels[q] if query_labels is not None else "query"
        _frame_axes(grid[q, 0], _strip(query_frames[q], frames_per_tracklet, reader), colour="#1f77b4", title=caption)
        for r in range(columns - 1):
            if r >= len(gallery_frames[q]):
                grid[q, r + 1].set_axis_off()
                continue
            colour = _CORRECT if correct[q, r] else _WRONG
            image = _strip(gallery_frames[q][r], frames_per_tracklet, reader)
            caption = gallery_labels[q][r] if gallery_labels is not None else f"rank {r + 1}"
            _frame_axes(grid[q, r + 1], image, colour=colour, title=caption)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return _save(figure, path)


def plot_attention(
    frames: list[list[str]],
    weights: list[np.ndarray],
    path: str | Path,
    labels: Sequence[str] | None = None,
    reader: FrameReader | None = None,
) -> Path:
    """Frames of a few tracklets, each frame above the bar of its temporal attention weight.

    Args:
        frames: per tracklet, its T sampled frame paths (the frames the weights refer to).
        weights: per tracklet, (T,) attention weights (softmax over T, so they sum to 1).
        path: output PNG.
        labels: per tracklet, a caption (name, ID, view, altitude, distance); "tracklet i" if None.
    """
    if len(frames) != len(weights):
        raise ValueError(f"{len(frames)} tracklets of frames but {len(weights)} weight vectors")
    if labels is not None and len(labels) != len(frames):
        raise ValueError(f"{len(frames)} tracklets but {len(labels)} labels")
    rows = max(len(frames), 1)
    longest = max((len(tracklet) for tracklet in frames), default=1)
    figure = Figure(figsize=(max(4.0, 0.75 * longest), 2.6 * rows))
    grid = figure.subplots(2 * rows, 1, squeeze=False, gridspec_kw={"height_ratios": [2, 1] * rows})
    for i, (tracklet, weight) in enumerate(zip(frames, weights, strict=True)):
        weight = np.asarray(weight, dtype=float).ravel()
        if weight.size != len(tracklet):
            raise ValueError(f"tracklet {i}: {len(tracklet)} frames but {weight.size} attention weights")
        # The strip spans the same x range as the bars, so each frame sits above its own weight.
        strip = grid[2 * i, 0]
        _frame_axes(strip, _strip(tracklet, None, reader), title=labels[i] if labels is not None else f"tracklet {i}")
        strip.images[0].set_extent((-0.5, weight.size - 0.5, 0, 1))
        strip.set_aspect("auto")
        strip.set_xlim(-0.5, weight.size - 0.5)
        strip.set_ylim(0, 1)
        bars = grid[2 * i + 1, 0]
        bars.bar(np.arange(weight.size), weight, width=0.8, color="#1f77b4")
        bars.axhline(1.0 / weight.size, color="grey", linestyle="--", linewidth=0.8)  # the uniform (mean) weight
        for x, w in enumerate(weight):
            bars.annotate(f"{w:.2f}", (x, w), ha="center", va="bottom", fontsize=6)
        bars.set_xlim(-0.5, weight.size - 0.5)
        bars.set_ylim(0, max(1.3 * weight.max(), 1.5 / weight.size))
        bars.set_xticks(np.arange(weight.size))
        bars.set_ylabel("weight", fontsize=7)
    figure.tight_layout()
    return _save(figure, path)


def plot_breakdown(breakdowns: dict[str, list[dict]], path: str | Path) -> Path:
    """mAP per bin of one or more query attributes (the output of `metrics.breakdown_by_bins`).

    Args:
        breakdowns: attribute name (e.g. "altitude (m)") -> list of bins with "low", "high", "count",
            "mAP" (a fraction, or None for a bin without a valid query: drawn as an empty bar).
        path: output PNG.
    """
    panels = max(len(breakdowns), 1)
    figure = Figure(figsize=(4.5 * panels, 3.5))
    grid = figure.subplots(1, panels, squeeze=False)
    for axes, (name, bins) in zip(grid[0], breakdowns.items(), strict=False):
        labels = [f"{b['low']:g}-{b['high']:g}" for b in bins]
        heights = [100.0 * b["mAP"] if b["mAP"] is not None else 0.0 for b in bins]
        positions = np.arange(len(bins))
        axes.bar(positions, heights, color="#1f77b4")
        for x, height, b in zip(positions, heights, bins, strict=True):
            axes.annotate(f"n={b['count']}", (x, height), ha="center", va="bottom", fontsize=7)
        axes.set_xticks(positions)
        axes.set_xticklabels(labels, rotation=30, fontsize=7)
        axes.set_xlabel(name)
        axes.set_ylabel("mAP (%)")
        axes.set_ylim(0, 105)
    figure.tight_layout()
    return _save(figure, path)
