"""When to run input checks that read tensor values back to the host.

A check such as ``int(camids.max())`` or ``bool(mask.any())`` is free on the CPU but synchronises a GPU stream
and breaks a ``torch.compile`` graph. Such checks run on CPU tensors always and on accelerators only when the
environment variable ``FARREID_CHECKS=1`` asks for them (a debug run); never inside a compiled region. Shape
checks need no values and always run. On a GPU a bad value still surfaces: an out-of-range camid as an
indexing error, an all-padding clip as a NaN that the non-finite-loss and non-finite-embedding checks report.
"""

import os

import torch

CHECKS_ENV = "FARREID_CHECKS"


def value_checks(tensor: torch.Tensor) -> bool:
    """True when a check reading the values of ``tensor`` should run now."""
    if torch.compiler.is_compiling():
        return False
    return tensor.device.type == "cpu" or os.environ.get(CHECKS_ENV) == "1"
