"""The tracklet table beside an index: one row per vector, held as flat column arrays (no Python object per row).

Row i of the table describes row i of the index (what ``farreid embed`` wrote to ``tracklets.csv``). Strings
(names) sit in one UTF-8 buffer with uint32 offsets (int64 past 4 GB); repeated strings (split, the folder above
the tracklet, the embedding folder it came from) are stored once and referenced by a code of the narrowest
integer type that holds their count; numbers are typed arrays. A row costs about 35 bytes plus its name, and the
CSV is read row by row into growing arrays that become the table's without a copy, so building the table never
holds the whole file as Python objects and peaks close to the table's own size (``benchmarks/scale.py``). On
disk it is a folder of ``.npy`` files, opened memory-mapped.
"""

from __future__ import annotations

import csv
import os
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VIEWS = ("ground", "aerial")  # view codes 0 and 1
# Numeric columns of tracklets.csv: (numpy dtype, array typecode, parser).
NUMBERS = {
    "pid": (np.int64, "q", int),
    "camid": (np.int16, "h", int),
    "altitude": (np.float32, "f", float),
    "distance": (np.float32, "f", float),
    "pitch": (np.float32, "f", float),
    "num_frames": (np.int32, "i", int),
}
CODED = ("split", "parent", "source")  # strings stored once, referenced by a code per row (narrow_codes)
REQUIRED = ("index", "split", "name", "pid", "camid", "view", *NUMBERS.keys() - {"pid", "camid"}, "folder")


class Strings:
    """Strings in one UTF-8 buffer: string i is ``buffer[offsets[i]:offsets[i + 1]]``."""

    __slots__ = ("buffer", "offsets")

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray) -> None:
        # (bytes,) uint8; (n + 1,) uint32, or int64 for a buffer of 4 GB or more
        self.buffer, self.offsets = buffer, offsets

    @classmethod
    def build(cls, values: Iterable[str]) -> Strings:
        data, columns = bytearray(), {"offsets": array("I", [0])}
        for value in values:
            data += value.encode("utf-8", "surrogateescape")
            append_int(columns, "offsets", len(data))
        return cls(np.frombuffer(data, dtype=np.uint8), as_numpy(columns["offsets"]))  # shared: no copy

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.buffer[start:stop].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes + self.offsets.nbytes


@dataclass
class TrackletTable:
    """Per-row metadata of an index.

    Attributes:
        names: tracklet folder names (:class:`Strings`).
        numbers: ``pid``, ``camid``, ``altitude``, ``distance``, ``pitch``, ``num_frames`` arrays (see NUMBERS).
        view: int8 codes into VIEWS.
        codes: ``split``, ``parent`` (the folder above the tracklet folder) and ``source`` (the embedding folder)
            codes into ``values`` (uint8, uint16 or int32 arrays, as the number of values needs).
        values: the distinct strings of each coded column.
    """

    names: Strings
    numbers: dict[str, np.ndarray]
    view: np.ndarray
    codes: dict[str, np.ndarray]
    values: dict[str, list[str]]

    def __len__(self) -> int:
        return len(self.view)

    @property
    def nbytes(self) -> int:
        arrays = [*self.numbers.values(), self.view, *self.codes.values()]
        strings = sum(len(v.encode()) + 50 for values in self.values.values() for v in values)
        return self.names.nbytes + sum(a.nbytes for a in arrays) + strings

    def column(self, name: str) -> np.ndarray | list[str]:
        """One column for all rows: numbers as arrays, ``view`` and coded columns as arrays of strings."""
        if name in self.numbers:
            return self.numbers[name]
        if name == "view":
            return np.array(VIEWS)[self.view]
        if name in self.codes:
            return np.array(self.values[name], dtype=object)[self.codes[name]]
        raise KeyError(f"no column {name!r}: expected one of {self.column_names()}")

    @staticmethod
    def column_names() -> list[str]:
        return ["name", *NUMBERS, "view", *CODED, "folder"]

    def row(self, i: int) -> dict:
        """Row ``i`` as a dict of Python values (``folder`` rebuilt from its parent and the name)."""
        out = {"name": self.names[i], "view": VIEWS[int(self.view[i])]}
        out.update({k: v[i].item() for k, v in self.numbers.items()})
        out.update({k: self.values[k][int(self.codes[k][i])] for k in CODED})
        out["folder"] = os.path.join(out["parent"], out["name"])
        return out

    def mask(self, where: dict[str, Sequence]) -> np.ndarray:
        """(N,) bool: rows whose column ``c`` is one of ``where[c]`` for every ``c`` (values compared as strings for
        view and the coded columns, as numbers for the numeric ones)."""
        keep = np.ones(len(self), dtype=bool)
        for name, wanted in where.items():
            if name in self.numbers:
                keep &= np.isin(self.numbers[name], np.asarray([float(w) for w in wanted]))
            elif name == "view":
                unknown = [w for w in wanted if w not in VIEWS]
                if unknown:
                    raise ValueError(f"view must be one of {VIEWS}, got {unknown}")
                keep &= np.isin(self.view, [VIEWS.index(w) for w in wanted])
            elif name in self.codes:
                known = [self.values[name].index(w) for w in wanted if w in self.values[name]]
                keep &= np.isin(self.codes[name], known)
            else:
                raise ValueError(f"cannot filter on {name!r}: expected one of {self.column_names()}")
        return keep

    def save(self, folder: str | os.PathLike) -> None:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {"names.buffer": self.names.buffer, "names.offsets": self.names.offsets, "view": self.view}
        arrays.update(self.numbers)
        arrays.update({f"{k}.code": v for k, v in self.codes.items()})
        arrays.update({f"{k}.values": Strings.build(v).buffer for k, v in self.values.items()})
        arrays.update({f"{k}.offsets": Strings.build(v).offsets for k, v in self.values.items()})
        for name, values in arrays.items():
            np.save(out / f"{name}.npy", values)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TrackletTable:
        """The table saved by :meth:`save`, memory-mapped (the pages are read when used)."""
        root = Path(folder)

        def read(name: str) -> np.ndarray:
            return np.load(root / f"{name}.npy", mmap_mode="r")

        names = Strings(read("names.buffer"), read("names.offsets"))
        values = {k: list(Strings(read(f"{k}.values"), read(f"{k}.offsets"))) for k in CODED}
        return cls(names, {k: read(k) for k in NUMBERS}, read("view"), {k: read(f"{k}.code") for k in CODED}, values)

    @classmethod
    def concat(cls, tables: Sequence[TrackletTable]) -> TrackletTable:
        """The rows of ``tables`` one after the other (coded columns re-coded)."""
        if len(tables) == 1:
            return tables[0]
        names = Strings.build(name for t in tables for name in t.names)
        numbers = {k: np.concatenate([t.numbers[k] for t in tables]) for k in NUMBERS}
        codes, values = {}, {}
        for k in CODED:
            merged = sorted({v for t in tables for v in t.values[k]})
            lookup = {v: i for i, v in enumerate(merged)}
            codes[k] = narrow_codes(
                np.concatenate(
                    [np.array([lookup[v] for v in t.values[k]], dtype=np.int32)[t.codes[k]] for t in tables]
                ),
                len(merged),
            )
            values[k] = merged
        return cls(names, numbers, np.concatenate([t.view for t in tables]), codes, values)


def read_table(path: str | os.PathLike, source: str) -> TrackletTable:
    """``tracklets.csv`` of ``farreid embed`` as a :class:`TrackletTable`, read row by row.

    Args:
        path: the CSV file. source: recorded in the ``source`` column of every row (the embedding folder).

    Raises:
        ValueError: a missing column, a row whose ``index`` is not its position, or a value that does not parse
            (the message names the file, the line and the column).
    """
    path = Path(path)
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty: expected the tracklets.csv header and one row per embedding")
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}: expected the tracklets.csv of `farreid embed`")
        at = {c: header.index(c) for c in header}
        names, views = bytearray(), array("b")
        numbers = {k: array(code) for k, (_, code, _) in NUMBERS.items()}
        coded = {"offsets": array("I", [0])} | {k: array("B") for k in CODED}  # widened when a value needs it
        lookups: dict[str, dict[str, int]] = {k: {} for k in CODED}
        for row_number, row in enumerate(reader):
            line = row_number + 2
            try:
                if int(row[at["index"]]) != row_number:
                    raise ValueError(f"index {row[at['index']]} on row {row_number}: rows must be in index order")
                name, folder, view = row[at["name"]], row[at["folder"]], row[at["view"]]
                if os.path.basename(folder) != name:
                    raise ValueError(
                        f"column folder: expected a path ending in the tracklet name {name!r}, got {folder!r}"
                    )
                if view not in VIEWS:
                    raise ValueError(f"column view: expected one of {VIEWS}, got {view!r}")
                for key, (_, _, parse) in NUMBERS.items():
                    try:
                        numbers[key].append(parse(row[at[key]]))
                    except (ValueError, OverflowError):
                        raise ValueError(f"column {key}: expected a number, got {row[at[key]]!r}") from None
            except IndexError:
                raise ValueError(f"{path}:{line}: {len(row)} fields, expected {len(header)}") from None
            except ValueError as err:
                raise ValueError(f"{path}:{line}: {err}") from None
            for key, value in (("split", row[at["split"]]), ("parent", os.path.dirname(folder)), ("source", source)):
                append_int(coded, key, lookups[key].setdefault(value, len(lookups[key])))
            names += name.encode("utf-8", "surrogateescape")
            append_int(coded, "offsets", len(names))
            views.append(VIEWS.index(view))
    # The arrays share the memory of the bytearray and the arrays filled above: no copy, so no second table at once.
    return TrackletTable(
        names=Strings(np.frombuffer(names, dtype=np.uint8), as_numpy(coded["offsets"])),
        numbers={k: np.frombuffer(numbers[k], dtype=NUMBERS[k][0]) for k in NUMBERS},
        view=np.frombuffer(views, dtype=np.int8),
        codes={k: as_numpy(coded[k]) for k in CODED},
        values={k: list(lookups[k]) for k in CODED},
    )


_WIDER = {"B": "H", "H": "i", "I": "q"}  # array typecodes: uint8 -> uint16 -> int32, uint32 -> int64
_LIMIT = {"B": 2**8 - 1, "H": 2**16 - 1, "I": 2**32 - 1}


def append_int(columns: dict[str, array], key: str, value: int) -> None:
    """Append ``value`` (>= 0) to ``columns[key]``, first widening the column to the next type when it needs it
    (once or twice per column: the arrays stay as narrow as their values)."""
    column = columns[key]
    if value > _LIMIT.get(column.typecode, value):
        column = columns[key] = array(_WIDER[column.typecode], column)
    column.append(value)


def as_numpy(column: array) -> np.ndarray:
    """The NumPy view of an integer ``array`` (its memory, its type)."""
    return np.frombuffer(column, dtype=np.dtype(column.typecode))


def narrow_codes(codes: np.ndarray, num_values: int) -> np.ndarray:
    """``codes`` (indices below ``num_values``) as uint8 or uint16 when that holds them, else as they are."""
    for dtype in (np.uint8, np.uint16):
        if num_values <= np.iinfo(dtype).max + 1:
            return codes.astype(dtype)
    return codes


def table_from_columns(
    names: Iterable[str],
    view: Sequence[str] | np.ndarray,
    *,
    split: str = "",
    parent: str = "",
    source: str = "",
    **numbers: Sequence,
) -> TrackletTable:
    """A table from whole columns (tests, benchmarks, Python users): ``view`` strings, NUMBERS as sequences
    (missing ones zero), one split, parent folder and source for every row."""
    names = Strings.build(names)
    unknown = set(numbers) - set(NUMBERS)
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}: expected some of {list(NUMBERS)}")
    view_codes = np.asarray([VIEWS.index(v) for v in view], dtype=np.int8)
    if len(view_codes) != len(names):
        raise ValueError(f"{len(names)} names but {len(view_codes)} views")
    columns = {k: np.asarray(numbers.get(k, np.zeros(len(names))), dtype=NUMBERS[k][0]) for k in NUMBERS}
    codes = {k: np.zeros(len(names), dtype=np.uint8) for k in CODED}  # one value each
    return TrackletTable(names, columns, view_codes, codes, {"split": [split], "parent": [parent], "source": [source]})
