"""Reading ``farreid embed`` outputs (``embeddings.npz`` + ``tracklets.csv``) for an index or a query set.

Every folder is checked before anything is built: the embeddings are a non-empty (N, D) float array of finite,
unit-length rows (``farreid embed`` L2-normalises), the table has one row per embedding, and all folders share D.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import InitVar, dataclass
from pathlib import Path

import numpy as np

from farreid.search.table import TrackletTable, read_table

EMBEDDINGS, TABLE = "embeddings.npz", "tracklets.csv"
# |norm - 1| allowed for a unit row: float32 normalisation gives ~1e-7; a float16 round trip ~1e-3.
UNIT_TOLERANCE = 1e-2


@dataclass
class EmbeddingSet:
    """Vectors and their tracklet table, row i for row i.

    Attributes:
        vectors: (N, D) float32, L2-normalised.
        table: the :class:`~farreid.search.table.TrackletTable` of the N rows.

    Checked once, when made (:func:`check_vectors`), so that what consumes it does not scan it again.
    """

    vectors: np.ndarray
    table: TrackletTable
    checked: InitVar[bool] = False  # read_embeddings checked each folder already (with its file's name)

    def __post_init__(self, checked: bool) -> None:
        if not checked:
            check_vectors(self.vectors, "embeddings", self.table.names)
        if len(self.table) != len(self.vectors):
            raise ValueError(f"{len(self.table)} table rows but {len(self.vectors)} embeddings")

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]


def check_vectors(vectors: np.ndarray, where: str, names=None) -> None:
    """Raise ValueError unless ``vectors`` is a non-empty (N, D) array of finite unit rows; names the first bad row."""
    if vectors.ndim != 2:
        raise ValueError(f"{where}: embeddings of shape {vectors.shape}, expected (N, D)")
    if len(vectors) == 0 or vectors.shape[1] == 0:
        raise ValueError(f"{where}: no embeddings (shape {vectors.shape}): expected at least one row")
    if not np.issubdtype(vectors.dtype, np.floating):
        raise ValueError(f"{where}: embeddings of dtype {vectors.dtype}, expected floats")

    def row(i: int) -> str:
        return f"row {i}" + (f" ({names[i]})" if names is not None else "")

    for start in range(0, len(vectors), 65536):  # in blocks: no (N, D) temporary
        block = np.asarray(vectors[start : start + 65536], dtype=np.float32)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            first = start + int(np.flatnonzero(~finite)[0])
            count = int((~finite).sum())
            raise ValueError(f"{where}: {row(first)} is not finite ({count} such rows in this block at least)")
        norms = np.linalg.norm(block, axis=1)
        off = np.abs(norms - 1.0) > UNIT_TOLERANCE
        if off.any():
            first = start + int(np.flatnonzero(off)[0])
            raise ValueError(
                f"{where}: {row(first)} has norm {norms[first - start]:.4f}, expected 1 (L2-normalised, as "
                "`farreid embed` writes)"
            )


def _read_npz(path: Path) -> np.ndarray:
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable .npz (not a zip archive): expected `farreid embed` output")
    try:
        with np.load(path) as saved:
            if "embeddings" not in saved.files:
                raise ValueError(f"{path}: no 'embeddings' array (has {saved.files}): expected `farreid embed` output")
            return saved["embeddings"]
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npz ({err}): expected `farreid embed` output") from None


def read_embeddings(folders: str | os.PathLike | Sequence[str | os.PathLike]) -> EmbeddingSet:
    """The embeddings and tracklet tables of one or more ``farreid embed`` folders, concatenated in order.

    Raises:
        FileNotFoundError: a folder, or its embeddings.npz or tracklets.csv, is missing.
        ValueError: an empty or malformed file, a non-finite or non-unit row, a table whose row count differs from
            its embeddings, or folders of different dimensions.
    """
    folders = [folders] if isinstance(folders, str | os.PathLike) else list(folders)
    if not folders:
        raise ValueError("no embedding folder given")
    vectors, tables, dims = [], [], {}
    for folder in map(Path, folders):
        npz, csv_path = folder / EMBEDDINGS, folder / TABLE
        for path in (folder, npz, csv_path):
            if not path.exists():
                raise FileNotFoundError(f"{path} not found: expected a `farreid embed --out` folder")
        array = _read_npz(npz)
        table = read_table(csv_path, source=str(folder))
        check_vectors(array, str(npz), table.names)
        if len(table) != len(array):
            raise ValueError(f"{csv_path} has {len(table)} rows but {npz} has {len(array)} embeddings")
        dims[str(folder)] = array.shape[1]
        if len(set(dims.values())) > 1:
            raise ValueError(f"embeddings of different dimensions: {dims}")
        vectors.append(np.ascontiguousarray(array, dtype=np.float32))
        tables.append(table)
    joined = vectors[0] if len(vectors) == 1 else np.concatenate(vectors)
    return EmbeddingSet(joined, TrackletTable.concat(tables), checked=True)
