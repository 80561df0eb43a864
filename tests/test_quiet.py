"""Quiet logs: the known-benign messages are filtered precisely, others still show; plain progress lines in files."""

import io
import subprocess
import sys
import textwrap
import warnings

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from farreid._quiet import PlainProgressBar, default_progress_bar, quiet_known_messages

NOISY = """
import sys
if sys.argv[1] == "quiet":
    from farreid._quiet import quiet_known_messages
    quiet_known_messages()
import lightning as L
from lightning.pytorch.loggers import CSVLogger
from transformers import CLIPVisionModelWithProjection
L.Trainer(logger=CSVLogger(sys.argv[3]), accelerator="cpu", enable_progress_bar=False)
CLIPVisionModelWithProjection.from_pretrained(sys.argv[2])  # a CLIPModel directory: the text keys are unused
from lightning.pytorch.utilities import rank_zero_warn
rank_zero_warn("Found 183 module(s) in eval mode at the start of training. This may lead to ...")
rank_zero_warn("a warning that must stay")
"""


def _run(mode: str, clip_dir, tmp_path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NOISY), mode, str(clip_dir), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.mark.slow
def test_benign_messages_are_filtered_and_others_kept(tiny_clip_dir, tmp_path):
    loud, quiet = _run("loud", tiny_clip_dir, tmp_path), _run("quiet", tiny_clip_dir, tmp_path)
    assert "LOAD REPORT" in loud and "module(s) in eval mode" in loud  # the messages exist without the filter...
    for text in ("Tip: For seamless cloud logging", "LOAD REPORT", "module(s) in eval mode", "Loading weights"):
        assert text not in quiet, text  # ...and are gone with it (the tip and the bar: in the versions that print them)
    assert "a warning that must stay" in quiet and "GPU available" in quiet


def test_warning_filters_match_the_messages_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_messages()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("something else about LeafSpec", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something else about LeafSpec"]


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_plain_progress_lines_in_a_real_fit(tmp_path):
    stream = io.StringIO()
    loader = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[PlainProgressBar(every_n_seconds=3600, stream=stream)],
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    trainer.fit(_Tiny(), loader, loader)
    lines = stream.getvalue().splitlines()
    # every_n_seconds is an hour: only the forced last line of each epoch and of each validation is printed.
    train = [line for line in lines if " train " in line]
    assert [line.split(" (")[0] for line in train] == [
        "[farreid] train epoch 0/1 step 4/4",
        "[farreid] train epoch 1/1 step 4/4",
    ]
    assert all("train/loss=" in line and "it/s" in line for line in train)
    assert sum(line.startswith("[farreid] validate step 4/4") for line in lines) == 2
    assert "\r" not in stream.getvalue()


def test_default_progress_bar_follows_the_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(default_progress_bar(io.StringIO()), PlainProgressBar)
    assert not isinstance(default_progress_bar(Terminal()), PlainProgressBar)
