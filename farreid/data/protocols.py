"""Evaluation protocols: the validation split carved from training identities and the released case folders.

An :class:`EvalSet` is a list of unique tracklets plus, per case, which of them are queries and which gallery.
Features are extracted once per tracklet and sliced per case, so a tracklet that is an A2G query and a G2A
gallery item (the validation split) is encoded once.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from farreid.data.detreidx import CASES, case_split
from farreid.data.index_cache import read_split
from farreid.data.tracklets import Tracklet

GROUND, SESSION1, SESSION2 = 0, 1, 2


@dataclass
class EvalSet:
    """Tracklets to encode and the query/gallery index arrays of each case.

    Attributes:
        tracklets: unique tracklets, in the order features are extracted.
        cases: case name ("A2G", "G2A", "A2A") -> (query indices, gallery indices) into ``tracklets``.
        anonymized: True when the PIDs carry no meaning (the released test set): rank, do not score.
    """

    tracklets: list[Tracklet]
    cases: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    anonymized: bool = False

    def __len__(self) -> int:
        return len(self.tracklets)

    def describe(self) -> str:
        parts = [f"{case}: {len(q)} query / {len(g)} gallery" for case, (q, g) in self.cases.items()]
        return ", ".join(parts)


def split_identities(pids: Sequence[int], val_share: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out a share of identities for validation, reproducibly from ``seed``.

    Args:
        pids: PIDs of the training tracklets (repeats allowed).
        val_share: fraction of identities held out, in [0, 1); 0 disables validation.
        seed: seed of the shuffle; the same seed and PIDs always give the same split.

    Returns:
        (training PIDs, validation PIDs), both sorted and disjoint.
    """
    if not 0.0 <= val_share < 1.0:
        raise ValueError(f"data.val_share must be in [0, 1), got {val_share}")
    unique = sorted(set(int(p) for p in pids))
    shuffled = unique[:]
    random.Random(seed).shuffle(shuffled)
    num_val = int(round(len(unique) * val_share))
    if val_share > 0 and num_val == 0:
        num_val = 1
    if num_val >= len(unique):
        raise ValueError(f"data.val_share={val_share} leaves no training identity out of {len(unique)}")
    return sorted(shuffled[num_val:]), sorted(shuffled[:num_val])


def validation_cases(tracklets: Sequence[Tracklet]) -> EvalSet:
    """Re-create A2G, G2A and A2A from held-out identities with real PIDs.

    A2G: aerial queries (both UAV sessions) against the ground gallery; G2A the reverse; A2A: session-1
    aerial queries against the session-2 aerial gallery. A case is dropped (with its reason raised) only if
    it would be empty.
    """
    tracklets = list(tracklets)
    camids = np.array([t.camid for t in tracklets])
    aerial = np.flatnonzero(camids != GROUND)
    ground = np.flatnonzero(camids == GROUND)
    s1, s2 = np.flatnonzero(camids == SESSION1), np.flatnonzero(camids == SESSION2)
    cases = {"A2G": (aerial, ground), "G2A": (ground, aerial), "A2A": (s1, s2)}
    for case, (q, g) in cases.items():
        if len(q) == 0 or len(g) == 0:
            raise ValueError(
                f"validation case {case} is empty ({len(q)} query / {len(g)} gallery tracklets): the held-out "
                f"identities need ground (camid 0) and both UAV sessions (camid 1 and 2); raise data.val_share"
            )
    return EvalSet(tracklets=tracklets, cases=cases, anonymized=False)


def released_cases(root: str, cases: Sequence[str] = tuple(CASES), cache_dir: str | None = None) -> EvalSet:
    """Read the case folders ``ROOT/caseN_*/{query,gallery}`` into one :class:`EvalSet`.

    ``cache_dir`` keeps each folder's listing in a cache file (see :func:`~farreid.data.index_cache.read_split`).

    The set counts as anonymized when no query PID of any case occurs in its gallery (the public test release
    renames identities), in which case farreid writes the challenge CSV instead of metrics.
    """
    tracklets: list[Tracklet] = []
    index: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    any_match = False
    for case in cases:
        parts = []
        for part in ("query", "gallery"):
            items = read_split(root, case_split(case, part), cache_dir=cache_dir)
            parts.append(np.arange(len(tracklets), len(tracklets) + len(items)))
            tracklets.extend(items)
        index[case] = (parts[0], parts[1])
        q_pids = {tracklets[i].pid for i in parts[0]}
        any_match |= any(tracklets[i].pid in q_pids for i in parts[1])
    return EvalSet(tracklets=tracklets, cases=index, anonymized=not any_match)
