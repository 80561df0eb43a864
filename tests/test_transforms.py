"""Tracklet transforms: uint8 decode at size, device-side normalisation, one random decision shared by all frames."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from farreid.data.transforms import CLIP_MEAN, CLIP_STD, TrackletTransform, load_frame, normalize_clip


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float (3, h, w) in [0, 1] (the reference the transforms are checked against)."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)


def gradient_frames(num: int, height: int = 16, width: int = 8) -> list[Image.Image]:
    """Frames whose red channel rises left to right and whose green channel encodes the frame number."""
    frames = []
    for t in range(num):
        arr = np.zeros((height, width, 3), dtype=np.uint8)
        arr[..., 0] = np.linspace(0, 255, width).astype(np.uint8)[None, :]
        arr[..., 1] = 20 * t
        arr[..., 2] = np.linspace(0, 255, height).astype(np.uint8)[:, None]
        frames.append(Image.fromarray(arr))
    return frames


def denormalise(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return x * std + mean


def test_test_mode_is_resize_and_normalise_only():
    frames = gradient_frames(3)
    transform = TrackletTransform(image_size=(16, 8), training=False)
    out = transform(frames)
    assert out.shape == (3, 3, 16, 8) and out.dtype == torch.float32
    expected = torch.stack([to_tensor(f) for f in frames])
    torch.testing.assert_close(denormalise(out), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(transform(frames), out)


def test_resize_to_requested_size():
    frames = [Image.new("RGB", (20, 40), (10, 200, 30)), Image.new("RGB", (9, 17), (10, 200, 30))]
    out = TrackletTransform(image_size=(32, 16))(frames)
    assert out.shape == (2, 3, 32, 16)
    # A constant image stays constant after resizing: the value is the normalised colour.
    expected = (torch.tensor([10, 200, 30]) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), expected, atol=1e-4, rtol=0)


def test_flip_is_shared_by_all_frames():
    frames = gradient_frames(5)
    plain = denormalise(TrackletTransform(image_size=(16, 8))(frames))
    transform = TrackletTransform(image_size=(16, 8), training=True, flip_p=0.5, erase_p=0.0, pad=0)
    flips = set()
    for seed in range(20):
        out = denormalise(transform(frames, random.Random(seed)))
        same = [torch.allclose(out[t], plain[t], atol=1e-5) for t in range(5)]
        flipped = [torch.allclose(out[t], plain[t].flip(-1), atol=1e-5) for t in range(5)]
        assert all(same) or all(flipped), f"seed {seed}: frames disagree on the flip"
        flips.add(all(flipped))
    assert flips == {True, False}  # both outcomes occur


def test_crop_offset_and_erase_box_are_shared():
    frames = gradient_frames(4)
    transform = TrackletTransform(image_size=(16, 8), training=True, flip_p=0.0, erase_p=1.0, pad=3)
    for seed in range(10):
        out = transform(frames, random.Random(seed))
        # Frames differ only by a constant in the green channel, so red/blue and the erased box must match.
        torch.testing.assert_close(out[:, [0, 2]], out[:1, [0, 2]].expand(4, -1, -1, -1))
        erased = (out == 0).all(dim=1)  # (T, H, W)
        assert erased.any() and (erased == erased[0]).all()


def test_pad_and_crop_is_a_shift_of_the_padded_image():
    frames = gradient_frames(2)
    plain = torch.stack([to_tensor(f) for f in frames])  # (T, 3, 16, 8)
    padded = torch.nn.functional.pad(plain, (3, 3, 3, 3))  # (T, 3, 22, 14), the reference
    transform = TrackletTransform(image_size=(16, 8), training=True, flip_p=0.0, erase_p=0.0, pad=3)
    offsets = set()
    for seed in range(40):
        out = denormalise(transform(frames, random.Random(seed)))
        matches = [
            (dy, dx)
            for dy in range(7)
            for dx in range(7)
            if torch.allclose(out, padded[:, :, dy : dy + 16, dx : dx + 8], atol=1e-5)
        ]
        assert matches, f"seed {seed}: output is no crop of the padded tracklet"
        offsets.update(matches)
    assert len(offsets) > 10


def test_colour_jitter_draws_once_per_tracklet():
    grey = [Image.new("RGB", (8, 16), (100, 100, 100)) for _ in range(3)]
    transform = TrackletTransform(image_size=(16, 8), training=True, flip_p=0, erase_p=0, pad=0, color_jitter=0.4)
    values = set()
    for seed in range(10):
        out = denormalise(transform(grey, random.Random(seed)))
        # Contrast and saturation leave a uniform grey unchanged, so only the brightness factor shows, and it
        # must be the same in every pixel of every frame.
        torch.testing.assert_close(out, out[0, 0, 0, 0].expand_as(out), atol=1e-5, rtol=0)
        factor = out[0, 0, 0, 0].item() / (100 / 255)
        assert 0.6 - 1e-4 <= factor <= 1.4 + 1e-4
        values.add(round(factor, 4))
    assert len(values) > 5


def test_training_requires_rng_and_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rng"):
        TrackletTransform(image_size=(16, 8), training=True, pad=2)(gradient_frames(1))
    with pytest.raises(ValueError, match="pad=10"):
        TrackletTransform(image_size=(16, 8), training=True, pad=10)
    with pytest.raises(ValueError, match="flip_p"):
        TrackletTransform(flip_p=1.5)
    with pytest.raises(ValueError, match="empty"):
        TrackletTransform()([])


def test_normalize_clip_uses_the_clip_constants():
    # Pinned: CLIP's published preprocessing constants (openai/CLIP, clip.py `_transform`).
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    frames = torch.randint(0, 256, (2, 3, 3, 4, 5), dtype=torch.uint8)
    out = normalize_clip(frames)
    expected = (frames.float() / 255 - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert out.dtype == torch.float32 and out.shape == frames.shape
    torch.testing.assert_close(out, expected)
    with pytest.raises(TypeError, match="uint8"):
        normalize_clip(frames.float())


@pytest.mark.parametrize("size", [(30, 12), (300, 120), (70, 30), (512, 256)])
def test_load_frame_matches_float_resize_up_to_rounding(tmp_path, size):
    """Decode-at-size equals the float pipeline (bilinear, antialiased) up to uint8 rounding."""
    rng = np.random.default_rng(0)
    height, width = size
    smooth = np.linspace(0, 255, height * width * 3).reshape(height, width, 3) + rng.normal(0, 20, (height, width, 3))
    image = Image.fromarray(smooth.clip(0, 255).astype(np.uint8))
    image.save(tmp_path / "f.png")
    out = load_frame(str(tmp_path / "f.png"), (64, 32))
    assert out.shape == (64, 32, 3) and out.dtype == np.uint8
    reference = torch.nn.functional.interpolate(to_tensor(image)[None], size=(64, 32), mode="bilinear", antialias=True)
    diff = (torch.from_numpy(out.copy()).permute(2, 0, 1).float() / 255 - reference[0].clamp(0, 1)).abs()
    assert diff.mean() < 1.5 / 255 and diff.max() < 6 / 255


def test_load_frame_reduced_jpeg_decode_keeps_at_least_the_output_size(tmp_path):
    Image.new("RGB", (1024, 2048), (40, 90, 200)).save(tmp_path / "big.jpg", quality=95)
    out = load_frame(str(tmp_path / "big.jpg"), (256, 128))
    assert out.shape == (256, 128, 3)
    assert np.abs(out.astype(int).mean(axis=(0, 1)) - [40, 90, 200]).max() < 3


def test_batched_augment_equals_one_tracklet_at_a_time():
    transform = TrackletTransform(image_size=(16, 8), training=True, flip_p=0.5, erase_p=0.5, pad=3, color_jitter=0.3)
    frames = torch.randint(0, 256, (6, 4, 3, 16, 8), dtype=torch.uint8)
    params = torch.stack([transform.draw(random.Random(seed)) for seed in range(6)])
    batched = transform.augment(frames, params, batched=True)  # every op over the batch, as on a GPU
    torch.testing.assert_close(transform.augment(frames, params), batched)  # the CPU default: one at a time
    for b in range(6):
        torch.testing.assert_close(batched[b], transform.augment(frames[b : b + 1], params[b : b + 1])[0])
    # and the single-tracklet path is the reference checked by the tests above (flip, shift, jitter, erase)
    assert len({tuple(p.tolist()) for p in params}) == 6


def test_cpu_slices_equal_the_device_gather_and_mask():
    """The CPU path (slice copies per tracklet) and the device path (one batched gather / mask) agree exactly,
    for every shift up to the padding, both flips and boxes touching the borders."""
    from farreid.data.transforms import _erase, _shift_flip

    transform = TrackletTransform(image_size=(12, 7), training=True, pad=6, erase_p=1.0)
    frames = torch.randint(0, 256, (40, 3, 3, 12, 7), dtype=torch.uint8)
    params = torch.stack([transform.draw(random.Random(seed)) for seed in range(40)])
    params[0, [1, 2]] = torch.tensor([6.0, -6.0])  # SHIFT_Y, SHIFT_X at the padding's extremes
    params[1, 6:10] = torch.tensor([0.0, 0.0, 12.0, 7.0])  # an erase box covering the whole frame
    assert {0.0, 1.0} <= set(params[:, 0].tolist())  # flipped and unflipped tracklets
    assert torch.equal(_shift_flip(frames, params, sliced=True), _shift_flip(frames, params, sliced=False))
    values = torch.rand(40, 3, 3, 12, 7)
    assert torch.equal(_erase(values.clone(), params, sliced=True), _erase(values.clone(), params, sliced=False))
    assert (_erase(values.clone(), params, sliced=True)[1] == 0).all()
