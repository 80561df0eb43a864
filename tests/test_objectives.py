"""The objectives are an injected part: a new loss is one class and one config line, through the real CLI."""

import pytest
import torch
from lightning.pytorch.core.mixins import hparams_mixin

from farreid.cli import main
from farreid.objectives import LossInputs, Objective, PromptSupCon, default_objectives
from tests.conftest import TINY_RUN


class EmbeddingNormPull(Objective):
    """A loss the tests add through one config line: pulls the pooled projection towards unit norm."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(weight)

    def forward(self, inputs: LossInputs) -> torch.Tensor | None:
        return self.weight * (inputs.proj.float().norm(dim=1) - 1.0).square().mean()


def _args(data_root, tmp_path, *extra: str) -> list[str]:
    return [
        *TINY_RUN,
        "--data.root",
        data_root,
        "--evaluator.rerank",
        "false",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.default_root_dir",
        str(tmp_path),
        *extra,
    ]


def test_a_loss_added_by_one_config_line_trains_and_is_logged(small_release, tmp_path):
    line = "--model.objectives.pull=tests.test_objectives.EmbeddingNormPull"
    fit = main(["fit", *_args(small_release, tmp_path / "fit", line), "--trainer.max_steps", "2"])
    assert isinstance(fit.model.objectives["pull"], EmbeddingNormPull)
    assert {"id", "triplet", "mid_triplet"} <= set(fit.model.objectives)  # the recipe's terms are still there
    assert "train/pull" in fit.trainer.callback_metrics  # logged by the real training loop

    def gradients(*extra: str) -> dict[str, torch.Tensor]:
        cli = main(_args(small_release, tmp_path / "grad", *extra), run=False)
        cli.datamodule.setup("fit")
        batch = cli.datamodule.on_after_batch_transfer(next(iter(cli.datamodule.train_dataloader())), 0)
        torch.manual_seed(0)
        cli.model.train()
        sum(cli.model.losses(batch).values()).backward()
        return {n: p.grad.clone() for n, p in cli.model.named_parameters() if p.grad is not None}

    with_pull, without = gradients(line), gradients()
    assert with_pull.keys() == without.keys()
    assert any(not torch.allclose(with_pull[n], without[n]) for n in without)  # the new term reached the weights


def test_terms_of_the_other_stage_are_refused(small_release, tmp_path):
    with pytest.raises(ValueError, match=r"model.objectives \['pull'\]: expected the loss terms of stage 2"):
        main(_args(small_release, tmp_path, "--model.objectives.pull=farreid.objectives.PromptSupCon"), run=False)


def test_default_terms_are_the_stages_own():
    assert {term.stage for term in default_objectives(1).values()} == {1}
    assert {term.stage for term in default_objectives(2).values()} == {2}
    assert isinstance(default_objectives(1)["i2t_supcon"], PromptSupCon)


def test_the_cli_hands_its_config_to_save_hyperparameters(small_release, tmp_path):
    """farreid reads Lightning's private `hparams_mixin._given_hyperparameters` to save the parts as configs (what
    `load_from_checkpoint` rebuilds the model from). If a Lightning release renames it, this fails by name."""
    assert hasattr(hparams_mixin, "_given_hyperparameters"), (
        "lightning.pytorch.core.mixins.hparams_mixin._given_hyperparameters is gone: update "
        "ReIDModule._save_hyperparameters (farreid/module.py)"
    )
    cli = main(_args(small_release, tmp_path), run=False)
    saved = cli.model.hparams
    assert saved["backbone"]["class_path"] == "farreid.models.backbone.CLIPVisionBackbone"
    assert saved["objectives"]["id"]["class_path"] == "farreid.objectives.IdentityLoss"
