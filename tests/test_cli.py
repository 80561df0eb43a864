"""The real entry point: `--print_config` on every config, short fits and tests through `main(args=[...])`."""

import json
from pathlib import Path

import pytest
import torch

from farreid.cli import main
from farreid.data.synthetic import generate
from farreid.runs import last_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = ["--config", str(CONFIGS / "vitl14.yaml"), "--config", str(CONFIGS / "tiny.yaml")]
ABLATIONS = sorted(p.name for p in (CONFIGS / "ablations").glob("*.yaml"))
COMBOS = [
    ["demo.yaml"],
    ["vitl14.yaml"],
    ["vitl14.yaml", "stage1.yaml"],
    ["baseline.yaml"],
    ["baseline.yaml", "stage1.yaml"],
    ["baseline.yaml", "tiny.yaml"],
    ["vitl14.yaml", "tiny.yaml"],
    *[["vitl14.yaml", f"ablations/{a}"] for a in ABLATIONS],
]
FAST = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.enable_progress_bar", "false"]


def _tiny(data_root: str, prompts: str, out) -> list[str]:
    """The tiny vitl14 recipe on generated data, reading stage 1's prompts, writing into ``out``."""
    return [*TINY, "--data.root", data_root, "--model.text_prompts", prompts, "--trainer.default_root_dir", str(out)]


@pytest.fixture(scope="module")
def data_root(make_release) -> str:
    return str(make_release(num_train_ids=10, num_test_ids=4, seed=0, max_frames=6))


@pytest.fixture(scope="module")
def stage1_prompts(data_root, tmp_path_factory) -> str:
    """Run stage 1 of the tiny vitl14 recipe once; the path its text prompts were written to."""
    out = tmp_path_factory.mktemp("stage1")
    prompts = str(out / "text_prompts.pt")
    args = ["fit", *TINY, "--config", str(CONFIGS / "stage1.yaml"), "--data.root", data_root]
    main(args + ["--model.text_prompts", prompts, "--trainer.default_root_dir", str(out), *FAST])
    return prompts


@pytest.mark.parametrize("combo", COMBOS, ids=["+".join(c) for c in COMBOS])
def test_print_config(combo, capsys):
    args = ["fit"] + [a for name in combo for a in ("--config", str(CONFIGS / name))] + ["--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: farreid.models.backbone.CLIPVisionBackbone" in printed
    assert "evaluator:" in printed


def test_stage1_writes_prompts_and_stage2_reads_them(stage1_prompts, data_root, tmp_path):
    saved = torch.load(stage1_prompts, weights_only=True)
    assert saved["context"].ndim == 3 and torch.isfinite(saved["context"]).all()
    model = main(["fit", *_tiny(data_root, stage1_prompts, tmp_path), *FAST]).model
    assert torch.equal(model.text.context.detach().cpu(), saved["context"])
    assert model.text_bank.shape == (model.hparams.num_classes, model.text.proj_dim)
    assert not model.text.context.requires_grad  # frozen in stage 2


def test_stage2_without_stage1_output_says_what_to_run(data_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="run stage 1 first"):
        main(["fit", *TINY, "--data.root", data_root, "--model.text_prompts", str(tmp_path / "none.pt"), *FAST])


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_fast_dev_run_every_ablation(ablation, data_root, stage1_prompts, tmp_path):
    ablation_config = ["--config", str(CONFIGS / "ablations" / ablation)]
    main(["fit", *_tiny(data_root, stage1_prompts, tmp_path), *ablation_config, "--trainer.fast_dev_run", "2"])


def test_fit_then_test_writes_results(data_root, stage1_prompts, tmp_path):
    common = _tiny(data_root, stage1_prompts, tmp_path)
    fit = main(["fit", *common, *FAST, "--trainer.check_val_every_n_epoch", "1"])
    ckpt = str(last_checkpoint(fit.trainer))
    assert Path(ckpt).is_file()
    assert "val/overall/mAP" in fit.trainer.callback_metrics
    tested = main(["test", *common, "--ckpt_path", ckpt, "--evaluator.figures", "true"])
    results = json.loads((Path(tested.trainer.log_dir or tmp_path) / "results.json").read_text())
    for case in ("A2G", "G2A", "A2A", "overall"):
        for key in ("mAP", "mINP", "rank1", "rank5", "rank10", "num_query", "num_gallery"):
            assert key in results[case], (case, key)
        assert 0.0 <= results[case]["mAP"] <= 1.0
    assert results["overall"]["num_query"] == sum(results[c]["num_query"] for c in ("A2G", "G2A", "A2A"))
    assert "rerank" in results  # vitl14 re-ranks at test
    assert set(results["breakdown"]) == {"altitude (m)", "distance (m)", "pitch (deg)"}
    aerial_queries = results["A2G"]["num_valid_query"] + results["A2A"]["num_valid_query"]
    assert sum(b["count"] for b in results["breakdown"]["pitch (deg)"]) == aerial_queries
    figures = list((Path(tested.trainer.log_dir or tmp_path) / "figures").glob("*.png"))
    assert {p.stem for p in figures} >= {"cmc_plain", "cmc_rerank", "ranked_A2G", "attention", "breakdown"}


@pytest.mark.parametrize(("subcommand", "rerank"), [("test", "false"), ("predict", "true")])
def test_anonymized_release_writes_the_challenge_csv(tmp_path, stage1_prompts, subcommand, rerank):
    from farreid.data.protocols import released_cases
    from farreid.evaluation.submission import read_submission

    root = generate(tmp_path / "anon", num_train_ids=8, num_test_ids=3, seed=2, anonymize=True, max_frames=5)
    args = [*TINY, "--data.root", str(root), "--model.text_prompts", stage1_prompts]
    cli = main([subcommand, *args, "--trainer.default_root_dir", str(tmp_path / "run"), "--evaluator.rerank", rerank])
    out = Path(cli.trainer.log_dir or tmp_path / "run")
    path = out / ("submission_rerank.csv" if rerank == "true" else "submission.csv")
    lines = path.read_text().splitlines()
    assert lines[0] == "row_id,case,query_tracklet,ranked_gallery_tracklets"
    assert lines[1].startswith("1,Case 1: Aerial to Ground,")  # the organisers' ids and case labels
    rankings = read_submission(path)  # validates: every row ranks each gallery tracklet exactly once
    expected = released_cases(str(root))
    assert expected.anonymized
    for case, (q, g) in expected.cases.items():
        queries, ranked = rankings[case]
        assert sorted(queries) == sorted(expected.tracklets[i].name for i in q)
        assert all(sorted(r) == sorted(expected.tracklets[i].name for i in g) for r in ranked)
    assert not (out / "results.json").exists()


def test_missing_root_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        main(["fit", *TINY, "--data.root", str(tmp_path / "nope"), *FAST])


def test_config_typo_is_reported(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *TINY, "--model.backbone.init_args.adaptr_dim", "3"])
    assert exit_info.value.code != 0
    assert "adaptr_dim" in capsys.readouterr().err


def test_unset_root_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("FARREID_DATA", raising=False)
    with pytest.raises(ValueError, match="FARREID_DATA"):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "vitl14.yaml"),
                "--config",
                str(CONFIGS / "tiny.yaml"),
                "--data.root",
                "null",
            ]
        )


def test_console_script_lists_the_subcommands():
    import subprocess
    import sys

    script = Path(sys.executable).parent / "farreid"
    if not script.exists():
        pytest.skip("the farreid console script is not installed in this environment (pip install -e .)")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in proc.stdout
    listing = " ".join(proc.stdout.split())  # argparse wraps the one-line descriptions
    assert "Score a checkpoint on the case folders" in listing and "Train the model (stage 1 or 2)" in listing
