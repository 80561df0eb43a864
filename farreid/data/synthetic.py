"""A synthetic DetReIDX stand-in: rendered pedestrians seen from ground cameras and from two UAV sessions.

Identities are combinations of shared attributes (clothing colours, pattern, build, skin, hair, accessory), so
no single cue identifies a person. Ground frames are sharp ~128×64 crops; aerial frames are 16–48 px tall,
foreshortened with the pitch (top-down views show head and shoulders), blurred, hazed, colour-shifted and
noisy, more so with altitude and distance. Every tracklet has a few degraded frames (motion blur, occlusion,
near-empty crops), and the second UAV session changes part of some identities' appearance (jacket, bag), so
A2A is the hardest case. The output is byte-identical for a given seed and arguments.

The ``geometry`` preset (``--preset geometry``, docs/GEOMETRY.md) makes the capture geometry matter more: a
systematic colour cast and darkening that grow with altitude, distance and pitch on top of the scale, blur,
foreshortening and haze, and :data:`HELD_OUT_CELLS`, (altitude bin, distance bin, pitch) combinations that no
training tracklet has and that make up ``held_out_share`` of the test identities' aerial tracklets.

Usage: ``python -m farreid.data.synthetic ROOT [--seed 0] [--anonymize] [--preset geometry]``; ``--layout mars``
(or agvpreid, g2a, lsvid, ilidsvid, prid, dukevideo) writes the same kind of people in another dataset's layout
(:mod:`farreid.data.layouts`).
"""

from __future__ import annotations

import argparse
import io
import shutil
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from farreid.data.detreidx import CASES
from farreid.data.layouts import LAYOUTS, write_layout
from farreid.data.render import TrackletSpec, render_tracklet, sample_people, second_session

# The reporting bins of farreid.evaluation.queries (ALTITUDE_BINS, DISTANCE_BINS), repeated here because data/ does
# not import evaluation/ (tests/test_geometry.py checks that they agree).
ALTITUDE_EDGES = (0.0, 20.0, 40.0, 60.0, 80.0, 200.0)
DISTANCE_EDGES = (0.0, 30.0, 60.0, 90.0, 200.0)
# (altitude bin, distance bin, pitch): combinations held out of training by the geometry preset (farreid choice:
# four cells spread over the grid so that every altitude bin but one, every distance bin and every pitch still
# appear in training on their own; only the combination is new at test).
HELD_OUT_CELLS = ((4, 0, 30), (0, 3, 90), (2, 1, 60), (3, 3, 30))
PRESETS = {"geometry": {"geometry_strength": 1.0, "held_out_share": 0.4}}


def geometry_cell(altitude: float, distance: float, pitch: int) -> tuple[int, int, int]:
    """(altitude bin, distance bin, pitch) of an aerial tracklet, binned by ALTITUDE_EDGES and DISTANCE_EDGES."""
    return (
        int(np.searchsorted(ALTITUDE_EDGES, altitude, side="right")) - 1,
        int(np.searchsorted(DISTANCE_EDGES, distance, side="right")) - 1,
        int(pitch),
    )


def _aerial_geometry(rng: np.random.Generator, cfg: dict, test: bool) -> tuple[float, float, int]:
    """Altitude (m), distance (m), pitch (deg) of one aerial tracklet; with held-out cells, training never draws
    them and a test tracklet is drawn inside one with probability ``held_out_share``."""
    if test and cfg["held_out"] and rng.random() < cfg["held_out_share"]:
        a_bin, d_bin, pitch = HELD_OUT_CELLS[int(rng.integers(len(HELD_OUT_CELLS)))]
        altitude = rng.uniform(max(ALTITUDE_EDGES[a_bin], 5.8), min(ALTITUDE_EDGES[a_bin + 1], 120.0))
        distance = rng.uniform(max(DISTANCE_EDGES[d_bin], 5.0), min(DISTANCE_EDGES[d_bin + 1], 120.0))
        return float(np.round(altitude, 1)), float(np.round(distance, 1)), int(pitch)
    while True:
        altitude = float(np.round(np.exp(rng.uniform(np.log(5.8), np.log(120.0))), 1))
        distance = float(np.round(rng.uniform(5.0, 120.0), 1))
        pitch = int(rng.choice([30, 60, 90]))
        if not cfg["held_out"] or geometry_cell(altitude, distance, pitch) not in HELD_OUT_CELLS:
            return altitude, distance, pitch


def plan_tracklets(rng: np.random.Generator, cfg: dict, test: bool = False) -> list[TrackletSpec]:
    """The tracklets of one identity: ~``ground_tracklets`` ground, ~``session_tracklets`` per UAV session."""
    specs = []
    for session, base in ((0, cfg["ground_tracklets"]), (1, cfg["session_tracklets"]), (2, cfg["session_tracklets"])):
        for _ in range(max(1, base + int(rng.integers(-1, 2)))):
            length = int(rng.integers(cfg["min_frames"], cfg["max_frames"] + 1))
            first = int(rng.integers(0, 90_000))
            if session == 0:
                specs.append(TrackletSpec("ground", 0, int(rng.integers(1, 4)), 0.0, 0.0, 0, length, first))
            else:
                altitude, distance, pitch = _aerial_geometry(rng, cfg, test)
                specs.append(
                    TrackletSpec("aerial", session, int(rng.integers(1, 3)), altitude, distance, pitch, length, first)
                )
    return specs


def frame_name(pid: int, number: int, spec: TrackletSpec, frame: int) -> str:
    """A file name in the DetReIDX grammar (see :func:`farreid.data.detreidx.parse_frame_name`)."""
    if spec.view == "ground":
        return f"{pid:04d}_{number}_G{spec.camera:02d}_{frame:06d}.jpg"
    fields = [f"{pid:04d}", str(number), f"D{spec.camera}", f"S{spec.session}", "00", "000"]
    fields += [f"{spec.altitude:.1f}", f"{spec.distance:.1f}", str(spec.pitch), str(spec.session), f"{frame:06d}"]
    return "_".join(fields) + ".jpg"


def _encode(image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _render_identity(job: tuple) -> list[list[bytes]]:
    """Render every tracklet of one identity (a picklable job for the worker pool) -> JPEG bytes per frame."""
    seed, index, person, person2, specs, cfg = job
    rng = np.random.default_rng([seed, index, 1])
    out = []
    for spec in specs:
        look = person2 if spec.session == 2 else person
        frames = render_tracklet(look, spec, rng, cfg)
        out.append([_encode(frame, cfg["jpeg_quality"]) for frame in frames])
    return out


def generate(
    root: str | Path,
    num_train_ids: int = 200,
    num_test_ids: int = 30,
    seed: int = 0,
    anonymize: bool = False,
    ground_tracklets: int = 2,
    session_tracklets: int = 2,
    min_frames: int = 4,
    max_frames: int = 20,
    ground_size: tuple[int, int] = (128, 64),
    aerial_height: tuple[int, int] = (16, 48),
    difficulty: float = 0.8,
    degraded_p: float = 0.12,
    session_change_p: float = 0.5,
    upper_colours: int = 7,
    lower_colours: int = 6,
    illumination: float = 0.15,
    jpeg_quality: int = 90,
    workers: int = 1,
    overwrite: bool = False,
    geometry_strength: float = 0.0,
    held_out_share: float = 0.0,
) -> Path:
    """Write a synthetic dataset in the DetReIDX layout and return its root.

    Args:
        root: output folder (created).
        num_train_ids: identities under ``train/``; num_test_ids: identities in the three case folders.
        seed: the only source of randomness; the same arguments give byte-identical files.
        anonymize: rename the case folders' PIDs with meaningless ids drawn separately for query and gallery.
        ground_tracklets, session_tracklets: mean tracklets per identity per ground / per UAV session (±1).
        min_frames, max_frames: tracklet length range (frames).
        ground_size: ground crop (height, width) in pixels; aerial_height: aerial crop height range (pixels),
            taller when the UAV is closer.
        difficulty: scales aerial blur, haze, colour shift and noise (0 = clean, 1 = default).
        degraded_p: per-frame probability of motion blur, occlusion or a near-empty crop.
        session_change_p: probability that an identity's upper clothing changes between UAV sessions (half
            that for a bag appearing/disappearing).
        upper_colours, lower_colours: how many palette colours clothing is drawn from (fewer = harder).
        illumination: per-tracklet spread of the channel gains (lighting / white balance), both views.
        jpeg_quality: JPEG quality of every frame.
        workers: rendering processes (the output does not depend on it).
        overwrite: replace existing ``train/`` and case folders under ``root`` instead of raising.
        geometry_strength: strength of the systematic, geometry-dependent colour cast and darkening of aerial
            frames (0 = none, the default generator; 1 = the geometry preset).
        held_out_share: > 0 holds :data:`HELD_OUT_CELLS` out of training; that share of the test identities' aerial
            tracklets is drawn inside them (0 = no held-out geometry).
    """
    if min_frames < 1 or max_frames < min_frames:
        raise ValueError(f"need 1 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
    if num_train_ids < 1 or not 1 <= num_test_ids <= 1600:  # 6 disjoint anonymous id pools must fit in 1..9999
        raise ValueError(f"need num_train_ids >= 1 and 1 <= num_test_ids <= 1600, got {num_train_ids}, {num_test_ids}")
    root = Path(root)
    targets = [root / "train"] + [root / c for c in CASES.values()]
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass overwrite=True (--overwrite) to replace the dataset")
    for target in existing:
        shutil.rmtree(target)
    cfg = dict(ground_tracklets=ground_tracklets, session_tracklets=session_tracklets, min_frames=min_frames)
    cfg.update(max_frames=max_frames, ground_size=tuple(ground_size), aerial_height=tuple(aerial_height))
    cfg.update(difficulty=difficulty, degraded_p=degraded_p, jpeg_quality=jpeg_quality, illumination=illumination)
    if not 0.0 <= held_out_share <= 1.0 or geometry_strength < 0:
        raise ValueError(
            f"need 0 <= held_out_share <= 1 and geometry_strength >= 0, got {held_out_share}, {geometry_strength}"
        )
    cfg.update(geometry_strength=geometry_strength, held_out=held_out_share > 0, held_out_share=held_out_share)
    rng = np.random.default_rng([seed, 0])
    num_ids = num_train_ids + num_test_ids
    people = sample_people(num_ids, rng, upper_colours, lower_colours)
    looks2 = [second_session(p, rng, session_change_p) for p in people]
    plans = [plan_tracklets(rng, cfg, test=i >= num_train_ids) for i in range(num_ids)]
    numbers = iter(rng.permutation(sum(len(p) for p in plans)) + 1000)  # tracklet numbers reveal no identity
    pids = [i + 1 for i in range(num_ids)]
    anon = rng.permutation(np.arange(1, 10_000))[: 6 * num_test_ids].reshape(3, 2, num_test_ids)  # (case, part, id)
    jobs = [(seed, i, people[i], looks2[i], plans[i], cfg) for i in range(num_ids)]
    if workers > 1:
        with get_context("spawn").Pool(workers) as pool:
            rendered = pool.map(_render_identity, jobs, chunksize=4)
    else:
        rendered = [_render_identity(job) for job in jobs]
    for i, (specs, frames) in enumerate(zip(plans, rendered, strict=True)):
        for spec, jpegs in zip(specs, frames, strict=True):
            number = int(next(numbers))
            for folder, pid in _destinations(i, pids[i], spec, num_train_ids, anon if anonymize else None):
                tracklet_dir = root / folder / f"{pid:04d}" / f"{pid:04d}_{number}"
                tracklet_dir.mkdir(parents=True, exist_ok=True)
                for t, data in enumerate(jpegs):
                    (tracklet_dir / frame_name(pid, number, spec, spec.first_frame + t)).write_bytes(data)
    return root


# Where each camera's tracklets of a test identity go: (case index, 0 query | 1 gallery).
_ROLES = {0: ((0, 1), (1, 0)), 1: ((0, 0), (1, 1), (2, 0)), 2: ((0, 0), (1, 1), (2, 1))}


def _destinations(
    i: int, pid: int, spec: TrackletSpec, num_train: int, anon: np.ndarray | None
) -> list[tuple[str, int]]:
    """(split folder, PID) pairs a tracklet is written to: train, or its query/gallery role in each case."""
    if i < num_train:
        return [("train", pid)]
    out = []
    for case_index, part in _ROLES[spec.session]:
        folder = f"{list(CASES.values())[case_index]}/{('query', 'gallery')[part]}"
        out.append((folder, pid if anon is None else int(anon[case_index, part, i - num_train])))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic DetReIDX-format dataset.")
    parser.add_argument("root", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--anonymize", action="store_true", help="meaningless PIDs in the case folders")
    parser.add_argument("--num-train-ids", type=int, default=200)
    parser.add_argument("--num-test-ids", type=int, default=30)
    parser.add_argument("--difficulty", type=float, default=0.8, help="aerial blur/haze/noise scale (0 = clean)")
    parser.add_argument("--session-change-p", type=float, default=0.5, help="appearance change between UAV sessions")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="geometry: docs/GEOMETRY.md")
    parser.add_argument("--max-frames", type=int, default=20, help="longest tracklet (frames)")
    parser.add_argument(
        "--layout",
        default="detreidx",
        choices=("detreidx", *LAYOUTS),
        help="detreidx (this module) or another reader's layout (farreid.data.layouts)",
    )
    args = vars(parser.parse_args(argv))  # every option but --layout is a keyword of `generate`
    start = time.perf_counter()
    layout = args.pop("layout")
    args.update(PRESETS.get(args.pop("preset") or "", {}))
    if layout == "detreidx":
        root = generate(args.pop("root"), **args)
    else:
        root = write_layout(args["root"], layout, args["num_train_ids"], args["num_test_ids"], seed=args["seed"])
    num_files = sum(1 for p in root.rglob("*") if p.suffix in (".jpg", ".png"))
    print(f"wrote {num_files} frames under {root} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
