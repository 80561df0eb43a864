"""The recipe: configs agree with docs/RECIPE.md and with the baseline's sources; losses, parameter groups and
the schedule do what the baseline does (each against a reference written here)."""

import functools
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from farreid.cli import main
from farreid.models.backbone import CLIPVisionBackbone
from farreid.models.pooling import TemporalAttentionPooling
from farreid.models.text import TextPromptLearner
from farreid.module import ReIDModule
from farreid.objectives import IdentityLoss, ImageTextLoss, ImageTextSupCon, MidTripletLoss, TripletLoss
from farreid.optim import WarmupCosine, warmup_cosine, warmup_multistep
from tests.conftest import TINY_TEXT_CONFIG, TINY_VISION_CONFIG

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# Run-directory keys belong to the run set-up, not to the recipe (docs/RECIPE.md says so).
NOT_RECIPE = ("trainer.default_root_dir", "trainer.logger", "trainer.callbacks", "model.text_prompts", "data.root")
RUN_KEYS = ("default_root_dir", "logger", "callbacks", "text_prompts", "root")
NUM_CLASSES = 4


def flatten(tree: dict, prefix: str = "") -> dict:
    """Dotted keys of a YAML tree, without the run-directory keys."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if dotted.startswith(NOT_RECIPE):
            continue
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def load(name: str) -> dict:
    return flatten(yaml.safe_load((CONFIGS / name).read_text()))


def recipe_table() -> dict[str, tuple[str, str]]:
    """The `| key | baseline | paper config | ...` rows of docs/RECIPE.md: key -> (baseline cell, paper cell)."""
    rows = {}
    text = (ROOT / "docs" / "RECIPE.md").read_text()
    section = text[text.index("## Every value") : text.index("Stage 1 (")]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            assert cells[0] not in rows, f"docs/RECIPE.md lists {cells[0]} twice"
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    return rows


def cell_value(cell: str):
    """A table cell: `yaml literal`, or — when the config does not set the key."""
    if cell == "—":
        return "absent"
    assert cell.startswith("`") and cell.endswith("`"), cell
    return yaml.safe_load(cell.strip("`"))


# ----------------------------------------------------------------------------------- configs and the table
def test_recipe_table_agrees_with_both_configs():
    table = recipe_table()
    baseline, paper = load("baseline.yaml"), load("vitl14.yaml")
    assert set(table) == set(baseline) | set(paper), "docs/RECIPE.md rows and the configs' keys differ"
    for key, (base_cell, paper_cell) in table.items():
        assert cell_value(base_cell) == baseline.get(key, "absent"), f"{key}: table {base_cell} vs baseline.yaml"
        assert cell_value(paper_cell) == paper.get(key, "absent"), f"{key}: table {paper_cell} vs vitl14.yaml"


def test_stage1_table_agrees_with_the_overlay():
    text = (ROOT / "docs" / "RECIPE.md").read_text()
    section = text[text.index("| key | stage 1 | source |") : text.index("## farreid's deliberate changes")]
    rows = {}
    for line in section.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3:
            rows[cells[0].strip("`")] = cell_value(cells[1])
    assert rows == load("stage1.yaml")


# The paper's named changes (and farreid choices marked in vitl14.yaml); every other value is the baseline's.
PAPER_CHANGES = {
    "trainer.precision",
    "trainer.max_epochs",
    "model.backbone.init_args.trainable_blocks",
    "model.backbone.init_args.checkpoint_blocks",
    "model.pooling.class_path",
    "model.backbone_lr_mult",
    "model.lr_scheduler.class_path",
    "model.lr_scheduler.init_args.warmup_steps",
    "model.lr_scheduler.init_args.warmup_factor",
    "model.lr_scheduler.init_args.milestones",
    "model.lr_scheduler.init_args.gamma",
    "model.lr_scheduler.init_args.min_lr_ratio",
    "model.flip_tta",
    "data.color_jitter",
    "evaluator.rerank",
    "evaluator.k1",
    "evaluator.k2",
    "evaluator.lambda_value",
}


def test_paper_config_is_the_baseline_plus_the_named_changes():
    baseline, paper = load("baseline.yaml"), load("vitl14.yaml")
    differing = {k for k in set(baseline) | set(paper) if baseline.get(k, "absent") != paper.get(k, "absent")}
    assert differing <= PAPER_CHANGES, f"vitl14.yaml departs from the baseline in {sorted(differing - PAPER_CHANGES)}"


@pytest.mark.parametrize("name", ["baseline.yaml", "vitl14.yaml", "stage1.yaml"])
def test_every_value_names_its_source_or_reason(name):
    lead_block = False
    for number, line in enumerate((CONFIGS / name).read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            lead_block = False
        elif indent == 2:  # a trainer/model/data key: run-directory blocks are not recipe values
            lead_block = line.strip().split(":")[0] in (
                "default_root_dir",
                "logger",
                "callbacks",
                "text_prompts",
                "root",
            )
        if lead_block:
            continue
        match = re.match(r"\s*(- )?([A-Za-z_]+):\s*([^#]*?)\s*(#.*)?$", line)
        if match is None or not match.group(3):  # a mapping header such as `model:` or `init_args:`
            continue
        comment = match.group(4) or ""
        sourced = re.search(r"\w[\w./ ]*\.(yml|py)\b|paper|baseline \(|\(farreid choice: .+\)", comment)
        assert sourced, f"configs/{name}:{number}: `{line.strip()}` names no source or farreid choice"


# (file, key, value there, farreid key): the organisers' vit_adapter.yml / defaults.py values the baseline uses.
SOURCES = [
    ("vit_adapter.yml", "MODEL.ID_LOSS_WEIGHT", 0.25, "model.objectives.id.init_args.weight"),
    ("vit_adapter.yml", "MODEL.TRIPLET_LOSS_WEIGHT", 1.0, "model.objectives.triplet.init_args.weight"),
    ("vit_adapter.yml", "MODEL.I2T_LOSS_WEIGHT", 1.0, "model.objectives.i2t.init_args.weight"),
    ("vit_adapter.yml", "MODEL.I2T_WEIGHT", 1.0, "model.objectives.supcon.init_args.weight"),
    ("vit_adapter.yml", "MODEL.PBP_PROMPT_DEEP", 9, "model.backbone.init_args.prompt_blocks"),
    ("vit_adapter.yml", "MODEL.PBP_PROMPT_LEN", 1, "model.backbone.init_args.prompt_tokens"),
    ("vit_adapter.yml", "SOLVER.STAGE2.BASE_LR", 1.0e-4, "model.optimizer.init_args.lr"),
    ("vit_adapter.yml", "SOLVER.STAGE2.WEIGHT_DECAY", 2.5e-4, "model.optimizer.init_args.weight_decay"),
    ("vit_adapter.yml", "SOLVER.STAGE2.BIAS_LR_FACTOR", 2, "model.bias_lr_mult"),
    ("vit_adapter.yml", "SOLVER.STAGE2.WEIGHT_DECAY_BIAS", 1.0e-4, "model.bias_weight_decay"),
    ("vit_adapter.yml", "SOLVER.STAGE2.WARMUP_ITERS", 10, "model.lr_scheduler.init_args.warmup_steps"),
    ("vit_adapter.yml", "SOLVER.STAGE2.WARMUP_FACTOR", 0.1, "model.lr_scheduler.init_args.warmup_factor"),
    ("vit_adapter.yml", "SOLVER.STAGE2.STEPS", [60, 90], "model.lr_scheduler.init_args.milestones"),
    ("vit_adapter.yml", "SOLVER.STAGE2.GAMMA", 0.1, "model.lr_scheduler.init_args.gamma"),
    ("vit_adapter.yml", "SOLVER.STAGE2.MAX_EPOCHS", 5, "trainer.max_epochs"),
    ("vit_adapter.yml", "SOLVER.STAGE2.LOG_PERIOD", 50, "trainer.log_every_n_steps"),
    ("vit_adapter.yml", "DATALOADER.SEQ_LEN", 16, "data.num_frames"),
    ("vit_adapter.yml", "TEST.SEQ_LEN", 16, "data.num_frames_test"),
    ("vit_adapter.yml", "DATALOADER.NUM_INSTANCE", 8, "data.k"),
    ("vit_adapter.yml", "TEST.IMS_PER_BATCH", 16, "data.batch_size_test"),
    ("vit_adapter.yml", "INPUT.PROB", 0.5, "data.flip_p"),
    ("vit_adapter.yml", "INPUT.RE_PROB", 0.5, "data.erase_p"),
    ("vit_adapter.yml", "TEST.RE_RANKING", False, "evaluator.rerank"),
    ("defaults.py", "SOLVER.SEED", 1234, "seed_everything"),
]


@pytest.mark.parametrize(("source", "key", "value", "farreid_key"), SOURCES, ids=[s[1] for s in SOURCES])
def test_baseline_values_are_the_sources_values(source, key, value, farreid_key):
    assert load("baseline.yaml")[farreid_key] == value
    leaf = farreid_key.rpartition(".")[2]
    lines = [line for line in (CONFIGS / "baseline.yaml").read_text().splitlines() if line.strip().startswith(leaf)]
    assert any(f"{source}: " in line and key in line for line in lines), f"{farreid_key} does not cite {source} {key}"


def test_baseline_batch_is_ims_per_batch_over_num_instance():
    baseline = load("baseline.yaml")
    assert baseline["data.p"] * baseline["data.k"] == 32  # vit_adapter.yml: SOLVER.STAGE2.IMS_PER_BATCH


def test_stage1_overlay_values():
    stage1 = load("stage1.yaml")
    assert stage1["trainer.max_epochs"] == 5  # vit_adapter.yml: SOLVER.STAGE1.MAX_EPOCHS
    assert stage1["model.optimizer.init_args.lr"] == 3.5e-4  # SOLVER.STAGE1.BASE_LR
    assert stage1["model.optimizer.init_args.weight_decay"] == 1.0e-4  # SOLVER.STAGE1.WEIGHT_DECAY
    assert stage1["model.lr_scheduler.init_args.min_lr_ratio"] == pytest.approx(
        1e-6 / 3.5e-4, rel=1e-3
    )  # LR_MIN / BASE_LR


# ------------------------------------------------------------------------------------------------ losses
LOGIT_SCALE = 100.0


def _objectives(
    id_weight=1.0,
    triplet_weight=1.0,
    mid_triplet_weight=0.5,
    i2t_weight=1.0,
    supcon_weight=0.0,
    label_smoothing=0.1,
    image_text_logits="cosine",
) -> dict:
    """The stage-2 terms with these weights (the recipe's objectives, built in Python)."""
    image_text = {"logits": image_text_logits, "logit_scale": LOGIT_SCALE}
    return {
        "id": IdentityLoss(id_weight, label_smoothing),
        "triplet": TripletLoss(triplet_weight),
        "mid_triplet": MidTripletLoss(mid_triplet_weight),
        "i2t": ImageTextLoss(i2t_weight, label_smoothing, **image_text),
        "supcon": ImageTextSupCon(supcon_weight, **image_text),
    }


def _module(**kwargs) -> ReIDModule:
    loss_keys = ("id_weight", "triplet_weight", "mid_triplet_weight", "i2t_weight", "supcon_weight")
    terms = {k: kwargs.pop(k) for k in (*loss_keys, "label_smoothing", "image_text_logits") if k in kwargs}
    torch.manual_seed(0)
    backbone = CLIPVisionBackbone(
        config=TINY_VISION_CONFIG,
        trainable_blocks=kwargs.pop("trainable_blocks", 0),
        adapter_dim=8,
        prompt_blocks=1,
        mid_block=0,
    )
    module = ReIDModule(
        backbone=backbone,
        pooling=TemporalAttentionPooling,
        num_classes=NUM_CLASSES,
        text=lambda n: TextPromptLearner(n, config=TINY_TEXT_CONFIG, n_ctx=2),
        objectives=_objectives(**terms),
        lr_scheduler=functools.partial(WarmupCosine, warmup_steps=0),
        **kwargs,
    )
    module.text_bank = 3.0 * torch.randn(NUM_CLASSES, backbone.proj_dim, generator=torch.Generator().manual_seed(5))
    return module.train()


def _batch(b: int = 8, t: int = 3) -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "frames": torch.randn(b, t, 3, 32, 16, generator=g),
        "mask": torch.ones(b, t, dtype=torch.bool),
        "camid": torch.arange(b) % 3,
        "label": torch.arange(b) % NUM_CLASSES,
    }


def smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, eps: float) -> torch.Tensor:
    """CLIP-ReID's CrossEntropyLabelSmooth: targets (1 - eps) one-hot + eps / C, mean over the batch."""
    classes = logits.shape[1]
    targets = (1 - eps) * F.one_hot(labels, classes).float() + eps / classes
    return -(targets * logits.log_softmax(dim=1)).sum(dim=1).mean()


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Hardest positive / negative per anchor by explicit loops, cosine distance."""
    losses = []
    for i in range(len(labels)):
        dist = [1 - F.cosine_similarity(features[i], features[j], dim=0) for j in range(len(labels))]
        pos = max(dist[j] for j in range(len(labels)) if j != i and labels[j] == labels[i])
        neg = min(dist[j] for j in range(len(labels)) if labels[j] != labels[i])
        losses.append(torch.relu(margin + pos - neg))
    return torch.stack(losses).mean()


def supcon(a: torch.Tensor, b: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """CLIP-ReID SupConLoss (temperature 1) by explicit loops: -mean over positives of log softmax(a_i . b)."""
    rows = []
    for i in range(len(a)):
        log_prob = (a[i] @ b.T).log_softmax(dim=0)
        rows.append(-log_prob[labels_b == labels_a[i]].mean())
    return torch.stack(rows).mean()


@pytest.mark.parametrize("image_text_logits", ["raw", "cosine"])
def test_stage2_losses_match_references(image_text_logits):
    weights = {"id_weight": 0.25, "triplet_weight": 1.0, "mid_triplet_weight": 0.7, "i2t_weight": 0.9}
    module = _module(image_text_logits=image_text_logits, supcon_weight=1.3, label_smoothing=0.1, **weights)
    batch = _batch()
    labels = batch["label"]
    losses = module.losses(batch)
    with torch.no_grad():
        out = module(batch["frames"], batch["camid"], batch["mask"])
        logits_cls, logits_proj = module.head_cls(out["cls"])[1], module.head_proj(out["proj"])[1]
        expected = {
            "id": 0.25 * (smoothed_ce(logits_cls, labels, 0.1) + smoothed_ce(logits_proj, labels, 0.1)),
            "triplet": batch_hard_triplet(out["cls"], labels, 0.3) + batch_hard_triplet(out["proj"], labels, 0.3),
            "mid_triplet": 0.7 * batch_hard_triplet(out["mid"], labels, 0.3),
        }
        image, bank, scale = out["proj"], module.text_bank, 1.0
        if image_text_logits == "cosine":
            image, bank, scale = F.normalize(image, dim=1), F.normalize(bank, dim=1), LOGIT_SCALE
        expected["i2t"] = 0.9 * smoothed_ce(scale * image @ bank.T, labels, 0.1)
        text = bank[labels]
        expected["supcon"] = 1.3 * (
            supcon(scale * image, text, labels, labels) + supcon(scale * text, image, labels, labels)
        )
    assert set(losses) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(losses[key].detach(), value, rtol=1e-4, atol=1e-5, msg=key)


def test_the_identity_loss_reads_the_bn_features_and_the_triplet_the_raw_ones():
    """The ID loss reads the BN neck's output; the triplet, i2t and SupCon losses read the pooled features before
    it (make_loss_video.py: `feat` list; processor_stage2.py: `image_features`). Scaling the BN weights moves only
    the ID loss."""
    module = _module(image_text_logits="raw", supcon_weight=1.0)
    with torch.no_grad():  # classifiers start near zero (logits ~ 0, CE ~ log C whatever the features)
        module.head_cls.classifier.weight.normal_()
        module.head_proj.classifier.weight.normal_()
    batch = _batch()
    before = {k: v.detach() for k, v in module.losses(batch).items()}
    with torch.no_grad():
        module.head_cls.bn.weight.mul_(3.0)
        module.head_proj.bn.weight.mul_(3.0)
    after = {k: v.detach() for k, v in module.losses(batch).items()}
    assert not torch.allclose(before["id"], after["id"])
    for key in ("triplet", "mid_triplet", "i2t", "supcon"):
        torch.testing.assert_close(before[key], after[key], msg=key)


# ----------------------------------------------------------------------------------- parameter groups
def test_baseline_parameter_groups_bias_factor_and_decay():
    module = _module(
        optimizer=lambda groups: torch.optim.Adam(groups, lr=1e-4, weight_decay=2.5e-4),
        bias_lr_mult=2.0,
        bias_weight_decay=1e-4,
        decay_vectors=True,
    )
    optimizer = module.build_optimizer()
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    trained = {name: p for name, p in module.named_parameters() if p.requires_grad}
    assert set(map(id, trained.values())) == set(group_of)
    assert not any(name.startswith("backbone.blocks.") and ".layer." in name for name in trained)  # frozen CLIP
    for name, param in trained.items():
        group = group_of[id(param)]
        is_bias = name.rpartition(".")[2].endswith("bias")
        assert group["lr"] == pytest.approx(2e-4 if is_bias else 1e-4), name
        assert group.get("weight_decay", 2.5e-4) == pytest.approx(1e-4 if is_bias else 2.5e-4), name


def test_farreid_default_groups_are_unchanged():
    module = _module(optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.05))
    groups = module.build_optimizer().param_groups
    assert sorted(g["name"] for g in groups) == ["new_decay", "new_no_decay"]
    assert all(p.ndim >= 2 for g in groups if g["name"] == "new_decay" for p in g["params"])


# ----------------------------------------------------------------------------------------------- schedules
def test_warmup_multistep_closed_form():
    factor = warmup_multistep(10, [60, 90], gamma=0.1, warmup_factor=0.1)
    for epoch in range(0, 100):
        warm = 0.1 * (1 - epoch / 10) + epoch / 10 if epoch < 10 else 1.0
        decay = 0.1 ** ((epoch >= 60) + (epoch >= 90))
        assert factor(epoch) == pytest.approx(warm * decay), epoch


def test_cosine_without_warmup_is_cosine_annealing():
    """vitl14.yaml: warmup_steps 0 + min_lr_ratio = torch's CosineAnnealingLR(T_max, eta_min), as in the fork."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1e-4)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20, eta_min=1e-6)
    factor = warmup_cosine(0, 20, min_lr_ratio=0.01)
    for epoch in range(20):
        assert 1e-4 * factor(epoch) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-6), epoch
        optimizer.step()
        reference.step()


@pytest.fixture(scope="module")
def data_root(make_release) -> str:
    return str(make_release(num_train_ids=10, num_test_ids=4, seed=0, max_frames=6))


def test_baseline_schedule_steps_once_per_epoch_in_a_real_fit(data_root, tmp_path):
    """Through `farreid fit`: after 3 epochs of 2 batches the multistep warm-up has taken 3 steps, not 6."""
    args = ["--config", str(CONFIGS / "baseline.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
    args += ["--data.root", data_root, "--model.text", "null", "--trainer.default_root_dir", str(tmp_path)]
    args += [
        "--trainer.max_epochs",
        "3",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.enable_progress_bar",
        "false",
    ]
    trainer = main(["fit", *args]).trainer
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.lr_scheduler_configs[0].interval == "epoch" and scheduler.last_epoch == 3
    lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
    warm = 0.1 * (1 - 3 / 10) + 3 / 10  # WarmupMultiStepLR after 3 epochs
    assert lrs["new_decay"] == pytest.approx(1e-4 * warm)
    assert lrs["new_bias"] == pytest.approx(2e-4 * warm)
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)
