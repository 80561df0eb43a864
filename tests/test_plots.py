"""Figures: each function writes a valid, non-empty PNG; the ranked list shows green and red frames."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from farreid.evaluation.plots import plot_attention, plot_breakdown, plot_cmc, plot_ranked_lists

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_tracklet(root: Path, name: str, num_frames: int = 5) -> list[str]:
    """Frames of a grey gradient person crop, written as JPEGs."""
    folder = root / name
    folder.mkdir(parents=True)
    paths = []
    for t in range(num_frames):
        pixels = np.full((64, 32, 3), 40 + 30 * t, dtype=np.uint8)
        path = folder / f"{t:04d}.jpg"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def assert_png(path: Path, returned: Path) -> np.ndarray:
    assert Path(returned) == path and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        assert image.width > 100 and image.height > 100
        return np.asarray(image.convert("RGB"))


def test_plot_cmc(tmp_path):
    curves = {"A2G": np.linspace(0.4, 1.0, 20), "G2A": np.linspace(0.3, 0.9, 20)}
    assert_png(tmp_path / "cmc.png", plot_cmc(curves, tmp_path / "cmc.png"))


def test_plot_ranked_lists_colours(tmp_path):
    queries = [make_tracklet(tmp_path, f"q{i}") for i in range(2)]
    gallery = [[make_tracklet(tmp_path, f"g{i}_{r}", 3) for r in range(10)] for i in range(2)]
    correct = np.zeros((2, 10), dtype=bool)
    correct[0, 0] = correct[1, 3] = True
    path = tmp_path / "figs" / "ranked.png"
    pixels = assert_png(path, plot_ranked_lists(queries, gallery, correct, path, frames_per_tracklet=2)).astype(int)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((green > 120) & (red < 80) & (blue < 80)).sum() > 50  # the green frames of the 2 correct matches
    assert ((red > 180) & (green < 80) & (blue < 80)).sum() > 50  # the red frames of the 18 wrong ones


def test_plot_attention(tmp_path):
    frames = [make_tracklet(tmp_path, f"t{i}", 4) for i in range(3)]
    weights = [np.array([0.1, 0.2, 0.3, 0.4])] * 3
    assert_png(tmp_path / "att.png", plot_attention(frames, weights, tmp_path / "att.png"))
    with pytest.raises(ValueError, match="4 frames but 3"):
        plot_attention(frames[:1], [np.ones(3) / 3], tmp_path / "bad.png")


def test_plot_breakdown(tmp_path):
    bins = [
        {"low": 0.0, "high": 30.0, "count": 4, "num_valid": 4, "mAP": 0.5},
        {"low": 30.0, "high": 60.0, "count": 0, "num_valid": 0, "mAP": None},
    ]
    path = tmp_path / "breakdown.png"
    assert_png(path, plot_breakdown({"altitude (m)": bins, "distance (m)": bins}, path))
