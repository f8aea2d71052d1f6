"""train -> test -> score end to end through the command line, on generated data."""

import csv
import json

import numpy as np
import pytest
import torch

import flow_mismatch as fm
from conftest import run_cli


@pytest.fixture(scope="module")
def evaluated(trained, mvtec, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    r = run_cli("test", "--ckpt", trained, "--data", mvtec, "--out", out, "-K", 2, "-T", 3, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return out, r


def test_train_writes_a_complete_checkpoint(trained):
    ckpt = torch.load(trained, weights_only=True)
    assert ckpt["step"] == 6 and ckpt["class_names"] == ["grid", "weave"] and ckpt["conditional"]
    assert {"model", "optimizer", "model_config", "train_config", "mean", "std", "data"} <= set(ckpt)
    assert ckpt["train_config"]["image_size"] == 16 and len(ckpt["mean"]) == len(ckpt["std"]) == 3
    assert ckpt["model_config"]["num_classes"] == 2


def test_train_prints_the_parameter_count(mvtec, tmp_path):
    r = run_cli("train", "--data", mvtec / "weave", "--out", tmp_path / "r", "--preset", "tiny", "--steps", 1,
                "--batch-size", 2, "--image-size", 16)
    assert r.returncode == 0, r.stderr
    n = sum(p.numel() for p in fm.build_model("tiny", 0).parameters())
    assert f"{n:,} parameters" in r.stderr and "unconditional" in r.stderr


def test_test_writes_every_output(evaluated, mvtec):
    out, r = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"grid", "weave", fm.MEAN}
    assert metrics[fm.MEAN].pop("categories") == dict.fromkeys(fm.METRICS, 2)  # what each mean is over
    for m in metrics.values():
        assert set(m) == set(fm.METRICS) and all(0 <= v <= 1 for v in m.values())
    assert (out / "table.md").read_text().strip() in r.stdout
    for cat in ("grid", "weave"):
        rows = list(csv.DictReader(open(out / cat / "scores.csv")))
        assert len(rows) == 8 and sum(int(row["label"]) for row in rows) == 4
        npz = np.load(out / cat / "heatmaps.npz")
        assert npz["heat"].shape == (8, 16, 16) and npz["heat"].dtype == np.float32
        assert npz["masks"].shape == (8, 16, 16) and npz["masks"].dtype == np.uint8
        assert npz["labels"].tolist() == [int(row["label"]) for row in rows]
        assert np.allclose(npz["scores"], [float(row["score"]) for row in rows])
        assert len(list((out / cat / "overlays").rglob("*.png"))) == 8


def test_saved_heatmaps_reproduce_the_reported_metrics(evaluated):
    out, _ = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    for cat in ("grid", "weave"):
        npz = np.load(out / cat / "heatmaps.npz")
        again = fm.compute_metrics(npz["labels"], npz["scores"], npz["masks"], npz["heat"])
        assert again == pytest.approx(metrics[cat])
        assert np.allclose(fm.image_score(torch.from_numpy(npz["heat"])).numpy(), npz["scores"], rtol=1e-6)


def test_fixed_seed_gives_the_same_heatmaps(evaluated, trained, mvtec, tmp_path):
    out, _ = evaluated
    first = np.load(out / "grid" / "heatmaps.npz")["heat"]
    for name, extra in (("same", []), ("chunked", ["--max-batch", 5])):
        r = run_cli("test", "--ckpt", trained, "--data", mvtec / "grid", "--out", tmp_path / name, "-K", 2, "-T", 3,
                    "--no-overlays", "--device", "cpu", *extra)
        assert r.returncode == 0, r.stderr
        again = np.load(tmp_path / name / "grid" / "heatmaps.npz")["heat"]
        if name == "same":
            assert np.array_equal(first, again)
        else:  # other forward batches: the same numbers up to float32 rounding
            assert np.allclose(first, again, rtol=1e-5, atol=1e-7)


def test_score_command_on_a_folder(trained, mvtec, tmp_path):
    folder = mvtec / "weave" / "test" / "stain"
    r = run_cli("score", "--ckpt", trained, folder, "--category", "weave", "--out", tmp_path, "-K", 2, "-T", 2)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    assert len(rows) == 2 and all(float(row["score"]) > 0 for row in rows)
    assert len(list((tmp_path / "heatmaps").rglob("*.png"))) == 2
    r = run_cli("score", "--ckpt", trained, folder, "--out", tmp_path / "x")
    assert r.returncode == 2 and "--category" in r.stderr


def test_pooled_training_is_unconditional(mvtec, tmp_path):
    r = run_cli("train", "--data", mvtec, "--out", tmp_path, "--preset", "tiny", "--steps", 1, "--batch-size", 2,
                "--image-size", 16, "--pooled")
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert not ckpt["conditional"] and ckpt["model_config"]["num_classes"] == 0
    assert ckpt["class_names"] == ["grid", "weave"]


def test_demo_runs_end_to_end_in_its_tiny_mode(tmp_path):
    r = run_cli("demo", "--out", tmp_path, "--steps", 2, "--image-size", 16)
    assert r.returncode == 0, r.stderr
    assert "demo: image AUROC" in r.stdout and "| mean |" in r.stdout
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())[fm.MEAN]["image_auroc"] >= 0


def test_bench_reports_agreement_of_batched_and_naive(tmp_path):
    r = run_cli("bench", "--preset", "tiny", "--device", "cpu", "-K", 2, "-T", 2, "--images", 2, "--image-size", 16,
                "--repeats", 1, "--json", tmp_path / "b.json")
    assert r.returncode == 0, r.stderr
    b = json.loads((tmp_path / "b.json").read_text())
    for key in ("naive_fps", "batched_fps", "speedup", "max_abs_diff", "peak_mem_bytes", "device", "preset", "K", "T"):
        assert key in b
    assert b["max_abs_diff"] <= 1e-5 and b["K"] == 2 and b["preset"] == "tiny"
    assert b["precision"] == "fp32" and b["other_precision"] == "bf16" and b["layout"] == "channels_last"
    assert 0 < b["bf16_heat_max_rel_diff"] < 0.02  # bf16 unit roundoff is 0.4 %; see test_scorer
