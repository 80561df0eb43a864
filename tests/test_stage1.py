"""Stage 1 on cached image features: same losses as the online path, no frame decoded, stage 2 reads the prompts."""

import functools
from pathlib import Path

import lightning as L
import pytest
import torch

from farreid.cli import main
from farreid.data.datamodule import DetReIDXDataModule
from farreid.data.transforms import normalize_clip
from farreid.models.backbone import CLIPVisionBackbone
from farreid.models.text import TextPromptLearner
from farreid.module import ReIDModule
from farreid.optim import WarmupCosine
from farreid.text_stage import cache_image_features
from tests.conftest import TINY_TEXT_CONFIG, TINY_VISION_CONFIG

NO_WARMUP = functools.partial(WarmupCosine, warmup_steps=0)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--config", str(CONFIGS / "vitl14.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
FAST = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def data_root(make_release) -> str:
    return str(make_release(num_train_ids=6, num_test_ids=3, seed=1, max_frames=6))


def _datamodule(root: str) -> DetReIDXDataModule:
    dm = DetReIDXDataModule(root=root, image_size=(32, 16), num_frames=3, p=2, k=2, num_workers=0, val_share=0.0)
    dm.setup("fit")
    return dm


def _stage1_module(num_classes: int, **kwargs) -> ReIDModule:
    torch.manual_seed(0)
    backbone = CLIPVisionBackbone(config=TINY_VISION_CONFIG, adapter_dim=8, prompt_blocks=1, mid_block=0)
    return ReIDModule(
        backbone=backbone,
        num_classes=num_classes,
        text=lambda n: TextPromptLearner(n, config=TINY_TEXT_CONFIG),
        stage=1,
        **kwargs,
    )


def test_cached_losses_equal_online_losses_on_the_same_clips(data_root):
    dm = _datamodule(data_root)
    model = _stage1_module(dm.num_classes)
    clips = dm.cached_feature_loader()
    bank = cache_image_features(model, clips)
    assert bank.shape == (len(dm.train_set), model.backbone.proj_dim)
    torch.testing.assert_close(bank.norm(dim=1), torch.ones(len(bank)))
    model.eval()  # the cache is computed in eval mode: compare the online path in the same mode
    for batch in clips:
        batch["frames"] = normalize_clip(batch["frames"])  # as on_after_batch_transfer does for the online path
        labels = torch.as_tensor(batch["label"])
        online = model.losses({**batch, "label": labels})
        model.image_bank = bank
        cached = model.losses({"index": batch["index"], "label": labels})
        model.image_bank = torch.empty(0)
        assert online.keys() == cached.keys() == {"i2t_supcon", "t2i_supcon"}
        for key in online:
            torch.testing.assert_close(cached[key], online[key], rtol=1e-5, atol=1e-6)


def test_label_view_items_carry_no_frames(data_root):
    dm = _datamodule(data_root)
    before = dm.train_set[3]
    dm.cached_feature_loader()
    item = dm.train_set[3]
    assert set(item) == {"index", "label", "pid", "camid"}
    assert (item["label"], item["pid"], item["camid"]) == (before["label"], before["pid"], before["camid"])
    assert dm.train_set.labels == dm.train_set.dataset.labels  # the identity sampler sees the same labels


class _BatchKeys(L.Callback):
    def __init__(self) -> None:
        self.keys: list[set[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys.append(set(batch))


@pytest.mark.parametrize("mode", ["cached", "online"])
def test_real_trainer_stage1_trains_prompts_without_decoding(data_root, tmp_path, mode):
    dm = _datamodule(data_root)
    model = _stage1_module(
        dm.num_classes, stage1_features=mode, text_prompts=str(tmp_path / "p.pt"), lr_scheduler=NO_WARMUP
    )
    before = model.text.context.detach().clone()
    seen = _BatchKeys()
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[seen],
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert len(seen.keys) == 3
    # setup() gave the model summary a clip of the data's geometry, so it counts real FLOPs (it printed 0).
    from lightning.pytorch.utilities.model_summary import summarize

    assert model.example_input_array[0].shape == (1, 3, 3, 32, 16)
    summary = summarize(model)
    if hasattr(summary, "total_flops"):  # Lightning >= 2.6 counts FLOPs
        assert summary.total_flops > 0
    if mode == "cached":
        assert all("frames" not in keys for keys in seen.keys)
        assert model.image_bank.shape == (len(dm.train_set), model.backbone.proj_dim)
    else:
        assert all("frames" in keys for keys in seen.keys) and model.image_bank.numel() == 0
    saved = torch.load(tmp_path / "p.pt", weights_only=True)["context"]
    assert saved.shape == before.shape and not torch.equal(saved, before)  # the prompts trained


def test_stage1_cached_by_default_through_the_cli_and_stage2_reads_it(data_root, tmp_path):
    prompts = str(tmp_path / "text_prompts.pt")
    stage1 = main(
        [
            "fit",
            *TINY,
            "--config",
            str(CONFIGS / "stage1.yaml"),
            "--data.root",
            data_root,
            "--model.text_prompts",
            prompts,
            "--trainer.default_root_dir",
            str(tmp_path / "s1"),
            *FAST,
        ]
    )
    assert stage1.model.hparams.stage1_features == "cached"
    assert stage1.model.image_bank.shape[0] == len(stage1.datamodule.train_set)
    saved = torch.load(prompts, weights_only=True)["context"]
    stage2 = main(
        [
            "fit",
            *TINY,
            "--data.root",
            data_root,
            "--model.text_prompts",
            prompts,
            "--trainer.default_root_dir",
            str(tmp_path / "s2"),
            *FAST,
        ]
    )
    assert torch.equal(stage2.model.text.context.detach().cpu(), saved)
    assert stage2.model.text_bank.shape == (stage2.model.hparams.num_classes, stage2.model.text.proj_dim)


def test_unknown_stage1_features_is_a_usage_error_naming_the_key(data_root, capsys):
    from farreid.cli import console

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert console(["fit", "--config", str(demo), "--data.root", data_root, "--model.stage1_features", "disk"]) == 2
    assert "model.stage1_features" in capsys.readouterr().err


def test_label_view_takes_the_samplers_seeded_keys(data_root):
    dm = _datamodule(data_root)
    dm.cached_feature_loader()
    assert dm.train_set[(4, 12345)] == dm.train_set[4]
