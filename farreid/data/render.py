"""The synthetic pedestrians: sampling identities, their appearance attributes, ground and aerial frames, degradations.

Plain PIL/NumPy, driven by a seeded ``numpy.random.Generator``: the same person, plan and generator state give
the same pixels. This module decides who the people are and what they look like; ``farreid.data.synthetic`` (the
DetReIDX layout) and ``farreid.data.layouts`` (the other datasets' layouts) decide where they appear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

ACCESSORIES = ("none", "backpack", "hat", "bag")
JACKET_COLOURS = ((60, 60, 70), (120, 90, 60), (40, 70, 50))
UPPER = ((190, 35, 35), (35, 60, 160), (225, 225, 225), (30, 30, 30), (45, 130, 60), (225, 190, 45), (120, 120, 125))
LOWER = ((30, 32, 45), (55, 80, 140), (115, 115, 115), (150, 125, 85), (220, 220, 215), (75, 50, 35))
PATTERN_COLOURS = ((240, 240, 240), (20, 20, 20), (200, 40, 40), (40, 60, 170))
SKIN = ((240, 205, 180), (200, 150, 110), (150, 100, 70), (95, 65, 45))
HAIR = ((20, 18, 15), (95, 60, 30), (200, 170, 100), (140, 140, 140))
BUILDS = ((0.82, 0.95), (1.0, 1.0), (1.22, 1.03))  # (width factor, height factor)


@dataclass(frozen=True)
class Person:
    """The appearance of one identity (RGB colours as 0–255 tuples)."""

    upper: tuple[int, int, int]
    pattern: Literal["solid", "stripes", "checks"]
    pattern_colour: tuple[int, int, int]
    lower: tuple[int, int, int]
    build: tuple[float, float]
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    accessory: str
    accessory_colour: tuple[int, int, int]


@dataclass(frozen=True)
class TrackletSpec:
    """One tracklet to render: camera, geometry, and which identity look to use."""

    view: Literal["ground", "aerial"]
    session: int  # 0 ground, 1/2 UAV session
    camera: int  # ground camera number (1..3) or UAV number
    altitude: float  # metres (0 for ground)
    distance: float  # metres (0 for ground)
    pitch: int  # degrees (0 for ground)
    num_frames: int
    first_frame: int


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator, amount: int = 12) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(np.asarray(colour) + rng.integers(-amount, amount + 1, 3), 0, 255))


def sample_people(num: int, rng: np.random.Generator, upper_colours: int = 5, lower_colours: int = 4) -> list[Person]:
    """``num`` identities with pairwise distinct attribute combinations (colours jittered slightly per person).

    Clothing colours come from the first ``upper_colours`` / ``lower_colours`` palette entries: with fewer
    colour pairs than identities, colour alone cannot tell people apart.
    """
    if not (1 <= upper_colours <= len(UPPER) and 1 <= lower_colours <= len(LOWER)):
        raise ValueError(f"need 1 <= upper_colours <= {len(UPPER)} and 1 <= lower_colours <= {len(LOWER)}")
    seen: set[tuple[int, ...]] = set()
    people = []
    while len(people) < num:
        combo = tuple(int(rng.integers(n)) for n in (upper_colours, 3, len(PATTERN_COLOURS), lower_colours, 3, 4, 4, 4))
        if combo in seen:
            continue
        seen.add(combo)
        u, pat, pc, lo, b, sk, h, acc = combo
        people.append(
            Person(
                upper=_jitter(UPPER[u], rng),
                pattern=("solid", "stripes", "checks")[pat],
                pattern_colour=PATTERN_COLOURS[pc],
                lower=_jitter(LOWER[lo], rng),
                build=BUILDS[b],
                skin=SKIN[sk],
                hair=HAIR[h],
                accessory=ACCESSORIES[acc],
                accessory_colour=_jitter((70, 55, 45), rng, 40),
            )
        )
    return people


def second_session(person: Person, rng: np.random.Generator, change_p: float) -> Person:
    """The identity's look in UAV session 2: a jacket put on or taken off, a bag appearing or disappearing."""
    if rng.random() < change_p:
        if rng.random() < 0.5:  # a plain jacket over whatever was worn
            person = replace(person, upper=JACKET_COLOURS[int(rng.integers(len(JACKET_COLOURS)))], pattern="solid")
        else:  # the session-1 top was a jacket: the shirt beneath shows now
            pattern = ("solid", "stripes", "checks")[int(rng.integers(3))]
            person = replace(person, upper=_jitter(UPPER[int(rng.integers(len(UPPER)))], rng), pattern=pattern)
    if rng.random() < change_p / 2:
        person = replace(person, accessory="none" if person.accessory == "bag" else "bag")
    return person


SCENES = ((128, 128, 124), (85, 88, 92), (92, 128, 70), (150, 120, 95), (170, 160, 140))
OBSTACLES = ((60, 60, 60), (150, 40, 40), (200, 200, 190), (40, 90, 50))
HAZE = np.array([185.0, 190.0, 200.0])
GROUND_GAINS = ((1.0, 1.0, 1.0), (1.08, 1.0, 0.92), (0.93, 0.98, 1.07))
SESSION2_LIGHT = np.array([1.0, 0.88, 0.74])  # the second UAV flight is later in the day: dimmer, warmer
AERIAL_RENDER_HEIGHT = 96  # aerial frames are drawn at this height, then shrunk to 16-48 px


def _foreshortening(pitch: float) -> float:
    """Vertical scale of the body seen at ``pitch`` degrees (1 side-on, 0.15 straight down)."""
    return max(0.15, math.cos(math.radians(pitch)))


def _figure_height(height: float, s: float) -> float:
    """Projected height of a person of standing ``height`` pixels at foreshortening ``s``."""
    return height * (0.19 + 0.34 * max(s, 0.4) + 0.44 * s)


def _draw_person(
    draw: ImageDraw.ImageDraw, p: Person, cx: float, top: float, height: float, phase: float, s: float
) -> None:
    """Draw a walking figure whose head top is at (cx, top); ``phase`` (radians) drives the leg/arm swing."""
    h = height * p.build[1]
    r = 0.075 * h  # head radius: a head looks round from any pitch
    # Shoulders stay visible from above (their depth, not their height, is what a top-down view sees).
    torso_w, torso_h, leg_h, arm_h = 0.30 * h * p.build[0], 0.34 * h * max(s, 0.4), 0.44 * h * s, 0.36 * h * s
    head_y = top + r
    shoulder = head_y + r * (0.4 + 0.6 * s)  # seen from above, the head hides the neck
    hip = shoulder + torso_h
    swing = 0.4 * math.sin(phase)
    for side in (-1, 1):
        x0 = cx + side * torso_w * 0.25
        end = (x0 + math.sin(side * swing) * leg_h, hip + math.cos(swing) * leg_h)
        draw.line([(x0, hip), end], fill=p.lower, width=max(1, round(0.12 * h * p.build[0])))
        draw.ellipse([end[0] - 0.05 * h, end[1] - 0.02 * h, end[0] + 0.05 * h, end[1] + 0.02 * h], fill=(25, 25, 25))
    if p.accessory == "backpack":
        draw.rectangle(
            [cx - 0.62 * torso_w, shoulder + 0.1 * torso_h, cx + 0.62 * torso_w, hip], fill=p.accessory_colour
        )
    draw.rectangle([cx - torso_w / 2, shoulder, cx + torso_w / 2, hip], fill=p.upper)
    step = max(2.0, 0.06 * h)
    if p.pattern in ("stripes", "checks"):
        for y in np.arange(shoulder + step / 2, hip, step):
            draw.line(
                [(cx - torso_w / 2, y), (cx + torso_w / 2, y)], fill=p.pattern_colour, width=max(1, round(step / 3))
            )
    if p.pattern == "checks":
        for x in np.arange(cx - torso_w / 2 + step / 2, cx + torso_w / 2, step):
            draw.line([(x, shoulder), (x, hip)], fill=p.pattern_colour, width=max(1, round(step / 3)))
    for side in (-1, 1):
        x0, y0 = cx + side * torso_w / 2, shoulder + 0.03 * h * s
        end = (x0 + side * 0.04 * h - math.sin(side * swing) * arm_h, y0 + math.cos(swing) * arm_h)
        draw.line([(x0, y0), end], fill=p.upper, width=max(1, round(0.07 * h)))
        draw.ellipse([end[0] - 0.03 * h, end[1] - 0.03 * h, end[0] + 0.03 * h, end[1] + 0.03 * h], fill=p.skin)
    if p.accessory == "bag":
        draw.line(
            [(cx - torso_w / 2, shoulder), (cx + torso_w / 2, hip)],
            fill=p.accessory_colour,
            width=max(1, round(0.03 * h)),
        )
        draw.rectangle(
            [cx + 0.3 * torso_w, hip - 0.1 * h * s, cx + 0.75 * torso_w, hip + 0.08 * h * s], fill=p.accessory_colour
        )
    draw.ellipse([cx - r, head_y - r, cx + r, head_y + r], fill=p.hair)
    draw.ellipse([cx - 0.85 * r, head_y - r + 2 * r * (0.3 + 0.65 * (1 - s)), cx + 0.85 * r, head_y + r], fill=p.skin)
    if p.accessory == "hat":
        draw.ellipse(
            [cx - 1.5 * r, head_y - 0.7 * r, cx + 1.5 * r, head_y + (0.2 + 1.0 * (1 - s)) * r], fill=p.accessory_colour
        )
        draw.ellipse([cx - 0.9 * r, head_y - 1.2 * r, cx + 0.9 * r, head_y + 0.3 * r], fill=p.accessory_colour)


def _background(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A textured scene (smooth noise + paving lines) of (height, width) pixels."""
    base = np.asarray(SCENES[int(rng.integers(len(SCENES)))], dtype=np.float64)
    cell = 8
    low = rng.normal(0.0, 18.0, (height // cell + 2, width // cell + 2, 3))
    low = np.repeat(np.repeat(low, cell, axis=0), cell, axis=1)[:height, :width]  # (h, w, 3)
    image = Image.fromarray(np.clip(base + low, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(cell / 2))
    draw = ImageDraw.Draw(image)
    spacing, shade = int(rng.integers(10, 30)), tuple(int(c * 0.8) for c in base)
    for y in range(int(rng.integers(spacing)), height, spacing):
        draw.line([(0, y), (width, y + int(rng.integers(-3, 4)))], fill=shade, width=1)
    return image


def _degrade(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """Motion blur (horizontal smear) or an occluder covering a band of the crop."""
    if kind == "motion":
        arr = np.asarray(image, dtype=np.float64)
        length = max(3, int(image.width * rng.uniform(0.08, 0.18)))
        arr = np.mean([np.roll(arr, shift, axis=1) for shift in range(length)], axis=0)  # (k, h, w, 3) -> (h, w, 3)
        return Image.fromarray(arr.astype(np.uint8))
    if kind == "occlusion":
        band = rng.uniform(0.35, 0.6) * image.height
        y0 = rng.uniform(0, image.height - band)
        x0 = rng.uniform(-0.3, 0.3) * image.width
        colour = OBSTACLES[int(rng.integers(len(OBSTACLES)))]
        ImageDraw.Draw(image).rectangle([x0, y0, x0 + image.width, y0 + band], fill=colour)
    return image


def _finish_aerial(
    image: Image.Image, spec: TrackletSpec, size: tuple[int, int], gains: np.ndarray, rng: np.random.Generator, d: float
) -> Image.Image:
    """Shrink to ``size`` (height, width), then blur, colour-shift, haze and add noise with range/altitude."""
    slant = math.hypot(spec.altitude, spec.distance)
    image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    image = image.filter(ImageFilter.GaussianBlur(0.25 + 0.6 * d * slant / 150))
    arr = np.asarray(image, dtype=np.float64) * gains
    haze = min(0.6, d * (0.4 * spec.altitude / 120 + 0.1 * spec.distance / 120))
    arr = arr * (1 - haze) + HAZE * haze + rng.normal(0.0, 2 + 6 * d * spec.altitude / 120, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def geometry_cast(spec: TrackletSpec, strength: float) -> np.ndarray:
    """(3,) RGB gains of the geometry preset: bluer with altitude, darker with distance, a green shift with pitch."""
    a, r, p = spec.altitude / 120, spec.distance / 120, (spec.pitch - 60) / 30
    cast = np.array([1 - 0.35 * a, 1 - 0.1 * a + 0.15 * p, 1 + 0.35 * a])
    return np.clip(cast * (1 - 0.3 * r), 0.2, 2.0) ** strength


def render_tracklet(person: Person, spec: TrackletSpec, rng: np.random.Generator, cfg: dict) -> list[Image.Image]:
    """Render the frames of one tracklet: a walking figure, crop jitter, a few degraded frames."""
    d, s = cfg["difficulty"], _foreshortening(spec.pitch)
    if spec.view == "ground":
        canvas_h, canvas_w = cfg["ground_size"]
        height = 0.88 * canvas_h / _figure_height(1.0, s)
    else:
        canvas_h = AERIAL_RENDER_HEIGHT
        height = canvas_h / (1.12 * _figure_height(1.0, s))
        canvas_w = int(np.clip(0.52 * height, 0.45 * canvas_h, 1.1 * canvas_h))
        lo, hi = cfg["aerial_height"]
        closeness = np.clip((math.log(math.hypot(spec.altitude, spec.distance)) - math.log(10)) / math.log(15), 0, 1)
        out_h = int(round(hi - (hi - lo) * closeness))
        out_size = (out_h, max(4, round(out_h * canvas_w / canvas_h)))
    spread = cfg["illumination"] + (0.12 * d if spec.view == "aerial" else 0.0)
    gains = rng.uniform(1 - spread, 1 + spread, 3) * rng.uniform(0.85, 1.15)  # white balance x exposure
    if spec.view == "ground":
        gains = gains * GROUND_GAINS[spec.camera - 1]
    elif spec.session == 2:
        gains = gains * (1 + d * (SESSION2_LIGHT - 1))
    if spec.view == "aerial" and cfg.get("geometry_strength", 0.0):
        gains = gains * geometry_cast(spec, cfg["geometry_strength"])
    margin = max(4, canvas_h // 10)
    scene = _background(rng, canvas_h + 2 * margin, canvas_w + 2 * margin)
    phase, stride, mirror = rng.uniform(0, 2 * math.pi), rng.uniform(0.5, 0.9), rng.random() < 0.5
    frames = []
    for t in range(spec.num_frames):
        kind = None
        if rng.random() < cfg["degraded_p"]:
            kind = str(rng.choice(["motion", "occlusion", "empty"], p=[0.4, 0.4, 0.2]))
        ox, oy = int(rng.integers(0, 2 * margin + 1)), int(rng.integers(0, 2 * margin + 1))
        image = scene.crop((ox, oy, ox + canvas_w, oy + canvas_h))
        size = height * rng.uniform(0.95, 1.05)
        cx = canvas_w / 2 + rng.normal(0, 0.04 * canvas_w)
        if kind == "empty":  # a detection that mostly missed the person
            cx += float(rng.choice([-1, 1])) * canvas_w * rng.uniform(0.75, 0.95)
        top = (canvas_h - _figure_height(size, s)) / 2 + rng.normal(0, 0.02 * canvas_h)
        _draw_person(ImageDraw.Draw(image), person, cx, top, size, phase + stride * t, s)
        if kind in ("motion", "occlusion"):
            image = _degrade(image, kind, rng)
        if mirror:
            image = ImageOps.mirror(image)
        if spec.view == "ground":
            arr = np.asarray(image, dtype=np.float64) * gains
            image = Image.fromarray(np.clip(arr + rng.normal(0.0, 2.0, arr.shape), 0, 255).astype(np.uint8))
        else:
            jitter = int(rng.integers(-1, 2))
            image = _finish_aerial(image, spec, (out_size[0] + jitter, out_size[1]), gains, rng, d)
        frames.append(image)
    return frames
