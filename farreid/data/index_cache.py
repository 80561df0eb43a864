"""Reading a split: :func:`read_split`, with a cache file per split for :func:`~farreid.data.detreidx.list_split`,
validated by folder modification times.

Listing DetReIDX (11.75 million frames) takes seconds to minutes; every fit, test and DDP rank would repeat it. The
cache holds the flat arrays of a :class:`~farreid.data.tracklets.SplitIndex` in one ``.npy`` file named after the
split's absolute path. It is valid while the modification times of the split folder, of every PID folder and of
every tracklet folder are those recorded: adding, removing or renaming a frame or a folder changes the time of
its parent folder (a file rewritten in place under the same name does not, and does not change the listing).

The dataset root may be read-only, so the cache lives elsewhere: ``data.index_cache_dir``, by default
``$XDG_CACHE_HOME/farreid/index`` (``~/.cache/farreid/index``). Files (a sequence of ``.npy`` records) are written
to a temporary name and renamed into place, so concurrent writers (DDP ranks, two runs) never leave a partial file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from farreid.data.detreidx import check_split, list_split
from farreid.data.tracklets import FrameNames, NameTable, SplitIndex, Tracklet

log = logging.getLogger(__name__)
_VERSION = 2  # bump when the file's contents change meaning (2: frame names as number patterns, FrameNames)
_ARRAYS = ("pid", "camid", "aerial", "altitude", "distance", "angle")
_NAME_ARRAYS = ("first", "count", "width", "numbers")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/farreid/index``, else ``~/.cache/farreid/index``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "farreid" / "index"


def cache_path(root: str | os.PathLike, split: str, cache_dir: str | os.PathLike) -> Path:
    """The cache file of a split: ``<cache_dir>/<split slug>-<hash of its absolute path>.npy``."""
    split_path = os.path.abspath(os.path.join(root, split))
    digest = hashlib.sha1(split_path.encode()).hexdigest()[:16]
    slug = split.strip("/").replace("/", "-") or "split"
    return Path(cache_dir) / f"{slug}-{digest}.npy"


def folder_stamp(split_path: str) -> str:
    """A digest of the names and modification times (ns) of the split, PID and tracklet folders."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{os.stat(split_path).st_mtime_ns}\n".encode())
    with os.scandir(split_path) as it:
        pid_dirs = sorted((e.name, e.path) for e in it if not e.name.startswith(".") and e.is_dir())
    for pid_name, pid_path in pid_dirs:
        with os.scandir(pid_path) as it:
            entries = sorted((e.name, e.stat().st_mtime_ns) for e in it if not e.name.startswith(".") and e.is_dir())
        digest.update(f"{pid_name} {os.stat(pid_path).st_mtime_ns}\n".encode())
        digest.update("".join(f"{name}:{mtime}\n" for name, mtime in entries).encode(errors="surrogateescape"))
    return digest.hexdigest()


def _join(strings: list[str]) -> np.ndarray:
    return np.frombuffer(os.fsencode("\0".join(strings)), dtype=np.uint8)


def _split(array: np.ndarray, count: int | None = None) -> list[str]:
    """The strings of :func:`_join`; ``count`` tells one empty string from none (both are an empty buffer)."""
    if not array.size:
        return [""] * (count or 0)
    return os.fsdecode(array.tobytes()).split("\0")


def save_index(index: SplitIndex, stamp: str, path: Path) -> None:
    """Write ``index`` and its folder ``stamp`` to ``path`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = index.names
    arrays = [getattr(index, name) for name in _ARRAYS] + [getattr(names, name) for name in _NAME_ARRAYS]
    arrays += [names.exact.buffer, names.exact.ends]
    arrays += [_join(strings) for strings in (index.folders, index.empty, index.stray, names.prefix, names.suffix)]
    header = np.array([str(_VERSION), stamp, index.split_path])
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp", delete=False) as f:
        tmp = f.name
        for array in [header, *arrays]:  # plain .npy records one after another: no zip, no checksum pass
            np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def load_index(path: Path, stamp: str, split_path: str) -> tuple[SplitIndex | None, str]:
    """The cached index if it is valid for ``stamp``; else (None, why not)."""
    if not path.is_file():
        return None, "no cache file yet"
    try:
        with open(path, "rb") as f:
            version, saved_stamp, saved_path = (str(x) for x in np.load(f, allow_pickle=False))
            if version != str(_VERSION) or saved_path != split_path:
                return None, f"cache format {version} for {saved_path}"
            if saved_stamp != stamp:
                return None, "folder modification times changed"
            arrays = {name: np.load(f, allow_pickle=False) for name in _ARRAYS}
            fields = {name: np.load(f, allow_pickle=False) for name in _NAME_ARRAYS}
            exact = NameTable(np.load(f, allow_pickle=False), np.load(f, allow_pickle=False))
            lists = {name: _split(np.load(f, allow_pickle=False)) for name in ("folders", "empty", "stray")}
            tracklets = len(lists["folders"])
            patterns = {name: _split(np.load(f, allow_pickle=False), tracklets) for name in ("prefix", "suffix")}
        numbered = fields["width"] > 0
        per_tracklet = [*arrays.values(), fields["first"], fields["count"], fields["width"], *patterns.values()]
        if (
            {len(a) for a in per_tracklet} != {tracklets}
            or len(exact.ends) != int(fields["count"][~numbered].sum())
            or len(fields["numbers"]) != int(fields["count"][numbered].sum())
        ):
            return None, "inconsistent cache contents"
        names = FrameNames(exact=exact, **fields, **patterns)
    except (OSError, ValueError, EOFError) as err:  # a damaged file is rebuilt, never trusted
        return None, f"unreadable cache ({type(err).__name__}: {err})"
    return SplitIndex(split_path=split_path, names=names, **arrays, **lists), "cached"


def cached_split(root: str | os.PathLike, split: str, cache_dir: str | os.PathLike) -> SplitIndex:
    """The split's index from its cache file when valid; else listed, saved, and (when stale) said so."""
    split_path = check_split(root, split)
    path = cache_path(root, split, cache_dir)
    stamp = folder_stamp(split_path)
    index, reason = load_index(path, stamp, split_path)
    if index is not None:
        log.info("read the listing of %s from %s", split_path, path)
        return index
    if path.exists():
        warnings.warn(
            f"index cache {path} of {split_path} is stale ({reason}): listing the folders again", stacklevel=3
        )
    index = list_split(root, split)
    try:
        save_index(index, stamp, path)
        log.info("listed %s and cached it in %s", split_path, path)
    except OSError as err:  # a read-only or full cache directory costs speed, not the run
        warnings.warn(f"could not write the index cache {path}: {err}; the split will be listed again", stacklevel=3)
    return index


def read_split(root: str | os.PathLike, split: str, cache_dir: str | os.PathLike | None = None) -> list[Tracklet]:
    """List the tracklets of one split, ordered by PID folder then tracklet folder name.

    Args:
        root: dataset root.
        split: "train" or a case part such as "case1_aerial_to_ground/query"
            (see :func:`~farreid.data.detreidx.case_split`).
        cache_dir: keep the listing in a cache file there (see :func:`cached_split`); None lists
            the folders every time.

    Returns:
        The tracklets; folders without any frame are skipped and counted in one warning, and so are entries
        that are neither folders nor frames. Their ``frames`` share one compact name table.

    Raises:
        FileNotFoundError: the root or split folder does not exist.
        ValueError: a PID folder name is not an integer, a tracklet mixes cameras, or the split is empty.
    """
    index = list_split(root, split) if cache_dir is None else cached_split(root, split, cache_dir)
    index.warn(stacklevel=2)
    return index.tracklets()
