"""The synthetic pedestrians of :mod:`farreid.data.synthetic`, written in the layout of every other dataset reader.

``write_layout(root, "mars")`` renders identities seen by a few cameras and writes them exactly as the real
release is laid out (folders, frame-name grammar, ``info/`` and split files; see ``docs/DATASETS.md``), so that each
reader in :mod:`farreid.data.datasets` has a fixture in its real format. Identities ``1..num_train_ids`` train,
the next ``num_test_ids`` test. The output is byte-identical for a given seed and arguments.

Usage: ``python -m farreid.data.synthetic ROOT --layout mars``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from farreid.data.render import TrackletSpec, render_tracklet, sample_people, second_session

# layout -> (views of its cameras in the order of their numbers, image format)
CAMERAS: dict[str, tuple[tuple[str, ...], str]] = {
    "agvpreid": (("ground", "ground", "ground", "ground", "aerial", "aerial"), "JPEG"),  # C0..C5, C4/C5 UAV
    "g2a": (("aerial", "ground"), "JPEG"),
    "mars": (("ground",) * 6, "JPEG"),
    "lsvid": (("ground",) * 4, "JPEG"),
    "ilidsvid": (("ground", "ground"), "PNG"),
    "prid": (("ground", "ground"), "PNG"),
    "dukevideo": (("ground",) * 4, "JPEG"),
}
LAYOUTS = tuple(CAMERAS)


@dataclass(frozen=True)
class Clip:
    """One rendered tracklet: identity (1-based), camera index (0-based, into ``CAMERAS[layout]``), encoded frames."""

    pid: int
    camera: int
    frames: tuple[bytes, ...]
    test: bool


def render_clips(
    layout: str,
    num_train_ids: int,
    num_test_ids: int,
    seed: int,
    cameras_per_id: int,
    min_frames: int,
    max_frames: int,
    ground_size: tuple[int, int] = (64, 32),
) -> list[Clip]:
    """Identities with one tracklet on each of ``cameras_per_id`` distinct cameras (at least one of each view the
    layout has), rendered with the DetReIDX generator's people, looks and degradations."""
    views, fmt = CAMERAS[layout]
    rng = np.random.default_rng([seed, 7])
    num_ids = num_train_ids + num_test_ids
    people = sample_people(num_ids, rng)
    looks2 = [second_session(p, rng, 0.3) for p in people]
    cfg = dict(ground_size=tuple(ground_size), aerial_height=(16, 40), difficulty=0.6, degraded_p=0.1)
    cfg.update(illumination=0.12, min_frames=min_frames, max_frames=max_frames)
    aerial = [c for c, v in enumerate(views) if v == "aerial"]
    ground = [c for c, v in enumerate(views) if v == "ground"]
    clips = []
    for i in range(num_ids):
        per_id = len(views) if layout in ("ilidsvid", "prid") else min(cameras_per_id, len(views))
        chosen = list(rng.choice(len(views), size=per_id, replace=False))
        for needed in (aerial, ground):  # an aerial-ground layout gives every identity both views
            if needed and not set(chosen) & set(needed):
                chosen[-1 if needed is aerial else 0] = int(rng.choice(needed))
        for cam in sorted(set(int(c) for c in chosen)):
            length = int(rng.integers(min_frames, max_frames + 1))
            if views[cam] == "aerial":
                altitude, distance = float(rng.uniform(10, 80)), float(rng.uniform(5, 60))
                spec = TrackletSpec("aerial", 1 + cam % 2, 1, altitude, distance, int(rng.choice([30, 60])), length, 0)
            else:
                spec = TrackletSpec("ground", 0, 1 + cam % 3, 0.0, 0.0, 0, length, 0)
            look = looks2[i] if spec.session == 2 else people[i]
            frames = render_tracklet(look, spec, np.random.default_rng([seed, i, cam]), cfg)
            clips.append(Clip(i + 1, cam, tuple(_encode(f, fmt) for f in frames), i >= num_train_ids))
    return clips


def _encode(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


# ---------------------------------------------------------------------------------------------------- writers
def _agvpreid(root: Path, clips: list[Clip], rng: np.random.Generator) -> None:
    """``train/`` and the two case folders; frames ``P{pid}T{date}A{alt}C{cam}E{event}K{key}F{frame}.jpg``."""
    for n, clip in enumerate(clips):
        aerial = CAMERAS["agvpreid"][0][clip.camera] == "aerial"
        if not clip.test:
            places = ["train"]
        else:  # A2G: aerial queries, ground gallery; G2A the reverse
            places = ["case1_aerial_to_ground/query", "case2_ground_to_aerial/gallery"]
            if not aerial:
                places = ["case1_aerial_to_ground/gallery", "case2_ground_to_aerial/query"]
        altitude = int(rng.integers(1, 5)) if aerial else 0
        stem = f"P{clip.pid:04d}T2308{11 + n % 9:02d}A{altitude}C{clip.camera}E{n % 3 + 1}K1"
        for place in places:
            folder = root / place / f"{clip.pid:04d}" / f"{clip.pid:04d}_{n:05d}"
            for f, data in enumerate(clip.frames):
                _write(folder / f"{stem}F{f + 1:03d}.jpg", data)


def _mars_names(clips: list[Clip], start_tracklet: int = 1) -> tuple[list[str], list[list[int]], list[bytes]]:
    names, rows, data = [], [], []
    for n, clip in enumerate(clips):
        pid = "00-1" if clip.pid < 0 else f"{clip.pid:04d}"
        first = len(names) + 1
        for f, frame in enumerate(clip.frames):
            names.append(f"{pid}C{clip.camera + 1}T{start_tracklet + n:04d}F{f + 1:03d}.jpg")
            data.append(frame)
        rows.append([first, len(names), clip.pid, clip.camera + 1])
    return names, rows, data


def _mars(root: Path, clips: list[Clip], rng: np.random.Generator) -> None:
    """``bbox_{train,test}/PPPP/*.jpg`` and ``info/`` (name lists, tracklet rows, 1-based query rows); one junk
    tracklet (PID -1, MARS's ``00-1`` folder) in the test rows, as the real release has."""
    from scipy.io import savemat

    train = [c for c in clips if not c.test]
    test = [c for c in clips if c.test]
    if test:
        test.insert(len(test) // 2, Clip(-1, test[0].camera, test[0].frames[:2], True))
    for split, items, key in (("train", train, "track_train_info"), ("test", test, "track_test_info")):
        names, rows, data = _mars_names(items)
        for name, frame in zip(names, data, strict=True):
            _write(root / f"bbox_{split}" / name[:4] / name, frame)
        _write(root / "info" / f"{split}_name.txt", "\n".join(names) + "\n")
        savemat(str(root / "info" / f"tracks_{split}_info.mat"), {key: np.asarray(rows, dtype=np.float64)})
    # queries: the first tracklet of every test identity (its other cameras stay in the gallery)
    first: dict[int, int] = {}
    for row, clip in enumerate(test):
        if clip.pid > 0:
            first.setdefault(clip.pid, row + 1)
    savemat(str(root / "info" / "query_IDX.mat"), {"query_IDX": np.asarray(sorted(first.values()), dtype=np.float64)})


def _lsvid(root: Path, clips: list[Clip], rng: np.random.Generator) -> None:
    """``list_sequence/list_seq_{train,test}.txt`` ('<prefix> <pid>'), frames ``<prefix><frame>.jpg`` with the
    camera (from 1) in the third ``_`` field, and ``test/data/info_test.mat`` (MATLAB v7.3 = HDF5) ``query``."""
    import h5py

    lists: dict[str, list[str]] = {"train": [], "test": []}
    queries, seen = [], set()
    for n, clip in enumerate(clips):
        split = "test" if clip.test else "train"
        prefix = f"tracklet_{split}/{clip.pid:04d}/{clip.pid:04d}_{n:04d}_{clip.camera + 1:02d}_"
        for f, data in enumerate(clip.frames):
            _write(root / f"{prefix}{f + 1:04d}.jpg", data)
        lists[split].append(f"{prefix} {clip.pid}")
        if clip.test and clip.pid not in seen:
            seen.add(clip.pid)
            queries.append(len(lists["test"]))
    for split, lines in lists.items():
        _write(root / "list_sequence" / f"list_seq_{split}.txt", "\n".join(lines) + "\n")
    path = root / "test" / "data" / "info_test.mat"
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as f:
        f.create_dataset("query", data=np.asarray([queries], dtype=np.float64))  # (1, Q) as h5py reads it
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, written by farreid's synthetic generator".ljust(116, b" "))


def _two_camera(root: Path, clips: list[Clip], cams: tuple[str, str], folder: Callable[[int], str], splits: str):
    persons = sorted({c.pid for c in clips})
    for clip in clips:
        person = folder(clip.pid)
        for f, data in enumerate(clip.frames):
            _write(root / cams[clip.camera] / person / f"{person}_{f + 1:05d}.png", data)
    rng = np.random.default_rng(len(persons))
    out = []
    for _ in range(10):  # the protocol's ten random halves of the persons (the clips' test flags do not apply)
        shuffled = [folder(int(p)) for p in rng.permutation(persons)]
        half = len(persons) // 2
        out.append({"train": sorted(shuffled[half:]), "test": sorted(shuffled[:half])})
    _write(root / splits, json.dumps(out, indent=1))
    return out


def _ilidsvid(root: Path, clips: list[Clip], rng: np.random.Generator) -> None:
    """``i-LIDS-VID/sequences/cam{1,2}/personNNN/*.png``, ``splits.json`` and the released ``.mat`` (``ls_set``)."""
    from scipy.io import savemat

    cams = ("i-LIDS-VID/sequences/cam1", "i-LIDS-VID/sequences/cam2")
    splits = _two_camera(root, clips, cams, lambda pid: f"person{pid:03d}", "splits.json")
    persons = sorted(p for s in splits[:1] for p in s["train"] + s["test"])
    number = {p: i + 1 for i, p in enumerate(persons)}
    ls_set = [[number[p] for p in s["test"] + s["train"]] for s in splits]  # first half tests
    (root / "train-test people splits").mkdir(parents=True, exist_ok=True)
    savemat(str(root / "train-test people splits" / "train_test_splits_ilidsvid.mat"), {"ls_set": np.asarray(ls_set)})


def _prid(root: Path, clips: list[Clip], rng: np.random.Generator) -> None:
    """``multi_shot/cam_{a,b}/person_NNNN/*.png`` and ``splits_prid2011.json``."""
    cams = ("multi_shot/cam_a", "multi_shot/cam_b")
    _two_camera(root, clips, cams, lambda pid: f"person_{pid:04d}", "splits_prid2011.json")


def _dukevideo(root: Path, clips: list[Clip], rng: np.random.Generator) -> None:
    """``{train,query,gallery}/PPPP/TTTT/PPPP_C{cam}_F{frame}_X{n}.jpg``; each test identity's first tracklet is
    its query."""
    queried: set[int] = set()
    for n, clip in enumerate(clips):
        split = "train"
        if clip.test:
            split = "gallery" if clip.pid in queried else "query"
            queried.add(clip.pid)
        folder = root / split / f"{clip.pid:04d}" / f"{n:04d}"
        for f, data in enumerate(clip.frames):
            _write(folder / f"{clip.pid:04d}_C{clip.camera + 1}_F{f + 1:04d}_X{n:05d}.jpg", data)


WRITERS: dict[str, Callable[[Path, list[Clip], np.random.Generator], None]] = {
    "agvpreid": _agvpreid,
    "g2a": _mars,
    "mars": _mars,
    "lsvid": _lsvid,
    "ilidsvid": _ilidsvid,
    "prid": _prid,
    "dukevideo": _dukevideo,
}


def write_layout(
    root: str | Path,
    layout: str,
    num_train_ids: int = 12,
    num_test_ids: int = 6,
    seed: int = 0,
    cameras_per_id: int = 3,
    min_frames: int = 3,
    max_frames: int = 8,
    ground_size: tuple[int, int] = (64, 32),
) -> Path:
    """Write a synthetic dataset in ``layout``'s real format under ``root`` (which must not exist or be empty).

    Args:
        layout: one of ``LAYOUTS`` (DetReIDX itself: :func:`farreid.data.synthetic.generate`).
        num_train_ids, num_test_ids: identities of the training and test split.
        cameras_per_id: cameras each identity is seen by, one tracklet each (iLIDS-VID and PRID-2011: both cameras;
            their ten splits are random halves of all identities, as the real protocol's).
        min_frames, max_frames: tracklet length range. ground_size: ground crop (height, width).
    """
    if layout not in WRITERS:
        raise ValueError(f"unknown layout {layout!r}: expected one of {sorted(WRITERS)}")
    if num_train_ids < 1 or num_test_ids < 1 or not 1 <= min_frames <= max_frames:
        raise ValueError("need >= 1 training and test identity and 1 <= min_frames <= max_frames")
    root = Path(root)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; write each layout into a new folder")
    root.mkdir(parents=True, exist_ok=True)
    clips = render_clips(layout, num_train_ids, num_test_ids, seed, cameras_per_id, min_frames, max_frames, ground_size)
    WRITERS[layout](root, clips, np.random.default_rng([seed, 11]))
    return root
