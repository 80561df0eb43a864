"""What the re-ranking stages share: chunked execution on worker threads, 2 MiB pages, CSR row helpers."""

import ctypes
import functools
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch
from rich.progress import track

C = TypeVar("C")
T = TypeVar("T")


@contextmanager
def chunk_workers(device: torch.device) -> Iterator[int]:
    """One intra-op thread on the CPU for the whole call; yields how many chunk workers to run instead.

    The sparse stages are many small, memory-bound gathers and scatters. With torch's intra-op threads every op
    ends at a barrier, and on 2 shared cores under load (average about 4) they ran 10x slower with two threads
    than with one (3-8 s vs 0.3-0.5 s at N = 6,000), each op waiting for a descheduled peer. Instead, independent
    chunks (blocks of the product, row strips, encoding and Jaccard row blocks) run on as many Python threads as
    torch had intra-op threads (ops release the GIL), each op single-threaded: a worker that is descheduled
    delays only its own chunks. On a GPU: one worker, the device's own parallelism.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield 1
        return
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


@functools.cache
def _madvise():
    """libc's `madvise`, or None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    function = ctypes.CDLL(None, use_errno=True).madvise
    function.argtypes, function.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return function


def huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """Asks Linux for 2 MiB pages under a fresh, untouched CPU tensor (madvise MADV_HUGEPAGE, what torch's own
    THP_MEM_ALLOC_ENABLE does for every allocation); a no-op elsewhere or where the kernel declines.

    The whole N x N matrix is first touched by the product: with 4 KiB pages that is one page fault per 4 KiB
    (36,000 at N = 6,000); measured, the first touch and fill of 144 MB took 0.6x the time with huge pages.
    """
    madvise = _madvise() if tensor.device.type == "cpu" else None
    if madvise is not None:
        start, huge = tensor.data_ptr(), 2 << 20
        first, last = -(-start // huge) * huge, (start + tensor.numel() * tensor.element_size()) // huge * huge
        if last > first:
            madvise(first, last - first, 14)  # MADV_HUGEPAGE; the return value only says whether it was taken
    return tensor


def row_chunks(total: int, size: int, workers: int = 1) -> list[tuple[int, int]]:
    """(start, stop) row ranges of at most `size` rows, and at least two per worker (to balance the workers)."""
    if workers > 1:
        size = min(size, -(-total // (2 * workers)))
    size = max(1, size)
    return [(start, min(start + size, total)) for start in range(0, total, size)]


def run_chunks(function: Callable[[C], T], chunks: Sequence[C], workers: int, description: str, show: bool) -> list[T]:
    """`function(chunk)` for every chunk (row ranges, block pairs, ...), results in order, on `workers` threads; a
    rich progress bar when `show`. Functions keep their scratch buffers in a `threading.local`, one per worker."""
    if workers <= 1 or len(chunks) <= 1:
        results = map(function, chunks)
        return list(track(results, total=len(chunks), description=description, disable=not show, transient=True))
    # Grad and inference mode are per thread: the workers take the caller's (e.g. Lightning's test-time
    # inference mode, whose tensors may not be written outside it).
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def call(chunk: C) -> T:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return function(chunk)

    with ThreadPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        results = pool.map(call, chunks)
        return list(track(results, total=len(chunks), description=description, disable=not show, transient=True))


def expand_segments(pointers: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattens the variable-length segments `pointers[r]:pointers[r + 1]` of every r in `rows`.

    Returns:
        owner: (E,) position in `rows` of each gathered element.
        position: (E,) index of each element in the arrays that `pointers` delimits.
    """
    starts = pointers.index_select(0, rows)
    counts = pointers.index_select(0, rows + 1) - starts
    owner = torch.repeat_interleave(torch.arange(rows.numel(), device=rows.device), counts)
    # Segment s starts at output offset cumsum(counts)[s] - counts[s] and at array offset starts[s].
    shift = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts)
    position = torch.arange(owner.numel(), device=rows.device) + shift
    return owner, position


def csr_pointers(counts: torch.Tensor) -> torch.Tensor:
    """CSR row pointers (R + 1,) from the (R,) entry counts of the rows."""
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
