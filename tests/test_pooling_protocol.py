"""`--model.pooling` accepts farreid's temporal poolings only (a TemporalPooling subclass), and says so in --help."""

import re
from pathlib import Path

import pytest

from farreid.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_help_lists_only_farreid_poolings(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    block = text[text.index("--model.pooling POOLING builds") :]
    listed = re.search(r"known subclasses: (.*?)\)", block).group(1)
    assert {s.strip() for s in listed.split(",")} == {
        "farreid.models.pooling.TemporalPooling",
        "farreid.models.pooling.MeanPooling",
        "farreid.models.pooling.TemporalAttentionPooling",
    }


def test_an_unrelated_module_is_refused_as_pooling(capsys):
    args = ["fit", "--config", str(CONFIGS / "vitl14.yaml"), "--model.pooling", "torch.nn.Identity", "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    assert "model.pooling" in capsys.readouterr().err
