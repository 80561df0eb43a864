"""The Trainer the ``farreid`` command runs: Lightning's, its entry points described for ``farreid --help``."""

from __future__ import annotations

import functools
import inspect

import lightning as L

SUBCOMMAND_HELP = {
    "fit": "Train the model (stage 1 or 2), validating on the held-out training identities.",
    "validate": "Score a checkpoint on the validation split carved from the training identities.",
    "test": "Score a checkpoint on the case folders (or write the challenge CSV on an anonymized release).",
    "predict": "Write the challenge submission CSV (whole gallery ranked per query) for a checkpoint.",
}


def _described(method, summary: str):
    """``method`` with ``summary`` as the first line of its docstring and the rest of its own kept (LightningCLI
    lists a subcommand by that first line, and documents its arguments from the rest)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return method(self, *args, **kwargs)

    original = inspect.getdoc(method) or ""
    rest = original.split("\n\n", 1)[1] if "\n\n" in original else ""
    wrapper.__doc__ = f"{summary}\n\n{rest}"
    return wrapper


class FarReIDTrainer(L.Trainer):
    """Lightning's Trainer, its entry points described for the ``farreid`` command's help."""

    fit = _described(L.Trainer.fit, SUBCOMMAND_HELP["fit"])
    validate = _described(L.Trainer.validate, SUBCOMMAND_HELP["validate"])
    test = _described(L.Trainer.test, SUBCOMMAND_HELP["test"])
    predict = _described(L.Trainer.predict, SUBCOMMAND_HELP["predict"])
