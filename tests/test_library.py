"""The library under the CLI: the configs are the one source of
defaults and ranges, fm.load(...).predict(...) gives the commands' numbers for any kind of input,
train's default folder and log, and a README whose commands, example and teaching map are true."""

import csv
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import flow_mismatch as fm
from conftest import ROOT

README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("make, argv", [
    (lambda: fm.ScoreConfig(K=0), ["score", "--ckpt", "none.pt", "imgs", "-K", "0"]),
    (lambda: fm.ScoreConfig(aggregator="median"), ["test", "--ckpt", "c", "--data", "d", "--aggregator", "median"]),
    (lambda: fm.TrainConfig(lr=float("nan")), ["train", "--data", "d", "--lr", "nan"]),
    (lambda: fm.TrainConfig(preset="tiny", image_size=18), ["train", "--data", "d", "--preset", "tiny",
                                                            "--image-size", "18"]),
    (lambda: fm.evaluate("c", "d", fm.Path("o"), fm.ScoreConfig(), eval_size=0),  # before anything is read
     ["test", "--ckpt", "c", "--data", "d", "--eval-size", "0"]),
])
def test_the_configs_refuse_what_the_cli_refuses_with_the_same_line(make, argv, capsys):
    with pytest.raises(fm.UserError) as e:
        make()
    assert fm.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"flow_mismatch.py: error: {e.value}"


def test_help_shows_every_knobs_default_and_range(capsys):
    for argv, says in ((["train", "--help"],
                        "--lr LR learning rate (default 0.0001; CPU presets: 0.0005; > 0 and <= 1000.0)"),
                       (["score", "--help"], "-K K paths per image (Eq. 3) (default 10; >= 1 and <= 1000)")):
        with pytest.raises(SystemExit):
            fm.main(argv)
        assert says in " ".join(capsys.readouterr().out.split())


@pytest.fixture(scope="module")
def bottle(mvtec, tmp_path_factory):
    """A folder mvtec/bottle and the README's own `train --data mvtec/bottle`, run in it (3 steps)."""
    cwd = tmp_path_factory.mktemp("bottle")
    shutil.copytree(mvtec / "weave", cwd / "mvtec" / "bottle")
    r = subprocess.run([sys.executable, str(ROOT / "flow_mismatch.py"), "train", "--data", "mvtec/bottle", "--preset",
                        "tiny", "--steps", "3", "--batch-size", "2", "--image-size", "16", "--device", "cpu"],
                       cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "wrote runs/bottle/ckpt.pt" in r.stdout
    return cwd


def test_train_defaults_to_runs_and_logs_every_step_once_across_a_resume(bottle):
    run = bottle / "runs" / "bottle"
    rows = list(csv.DictReader(open(run / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and (run / "loss.png").stat().st_size > 0
    assert all(float(r["loss"]) > 0 and float(r["lr"]) == 5e-4 and float(r["images_per_s"]) > 0 for r in rows)
    copy = bottle / "resumed"
    shutil.copytree(run, copy)
    with open(copy / "train_log.csv", "a") as f:  # a step logged after the last checkpoint, then killed
        f.write("4,9.9,0.0005,1.0,1.0\n")
    fm.train(None, fm.TrainConfig(steps=5), copy, "cpu", resume=True, log=lambda *_: None)
    rows = list(csv.DictReader(open(copy / "train_log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5] and float(rows[3]["loss"]) != 9.9


def readme_python_example() -> str:
    return README.split("### From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_from_python_example_runs_as_printed_on_the_demos_checkpoint(trained, mvtec, tmp_path,
                                                                                monkeypatch, capsys):
    """In a folder laid out as the demo leaves it (its two categories, a class-conditional model)."""
    shutil.copytree(mvtec, tmp_path / "demo_out" / "data")
    (tmp_path / "demo_out" / "run").mkdir()
    shutil.copy(trained, tmp_path / "demo_out" / "run" / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_example(), "README", "exec"), {})
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "['grid', 'weave']" and out[-1].endswith("(100, 150)")


def test_the_readme_from_python_example_runs_on_a_one_category_run_without_category(bottle, monkeypatch, capsys):
    """As the README says: a one-category run's checkpoint and folder, and no category=."""
    block = readme_python_example()
    for old, new in (("demo_out/run/ckpt.pt", "runs/bottle/ckpt.pt"), ("demo_out/data/weave", "mvtec/bottle"),
                     (', category="weave"', "")):
        assert old in block
        block = block.replace(old, new)
    monkeypatch.chdir(bottle)
    exec(compile(block, "README", "exec"), {})
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "['bottle']" and out[-1].endswith("(100, 150)")


def test_a_missing_category_names_the_keyword_from_python_and_the_flag_from_the_cli(trained, mvtec, tmp_path,
                                                                                   capsys):
    folder = mvtec / "weave" / "test" / "good"
    with pytest.raises(fm.UserError) as e:
        fm.load(trained, "cpu").predict(folder, K=1, T=1)
    assert str(e.value) == "category=: give one of ['grid', 'weave'] for this class-conditional model"
    assert fm.main(["score", "--ckpt", str(trained), str(folder), "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "flow_mismatch.py: error: --category: give one of ['grid', 'weave'] for this class-conditional model"


def test_predict_takes_paths_pil_images_arrays_and_tensors_alike(bottle):
    detector = fm.load(bottle / "runs" / "bottle" / "ckpt.pt", "cpu")
    files = sorted((bottle / "mvtec" / "bottle" / "test" / "stain").iterdir())
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    ways = [files, [Image.open(f) for f in files], np.stack(arrays), arrays,
            torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255]
    preds = [detector.predict(images, K=2, T=2) for images in ways]
    for p in preds[1:]:
        assert np.array_equal(p.pred_score, preds[0].pred_score) and p.image_path == [None, None]
    assert preds[0].image_path == [str(f) for f in files]
    wide = detector.predict(np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8), K=2, T=2)
    assert wide.anomaly_map[0].shape == (100, 150) and wide.p_value is None
    with pytest.raises(fm.UserError, match="images"):
        detector.predict(np.zeros((4, 4), np.float32))


def test_predict_equals_the_score_command(bottle, tmp_path):
    ckpt, folder = bottle / "runs" / "bottle" / "ckpt.pt", bottle / "mvtec" / "bottle" / "test" / "good"
    assert fm.main(["score", "--ckpt", str(ckpt), str(folder), "--out", str(tmp_path), "-K", "2", "-T", "2",
                    "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "scores.csv")))
    pred = fm.load(ckpt, "cpu").predict(folder, chunk=1, K=2, T=2)  # other chunks: each image keeps its paths
    assert pred.image_path == [r["path"] for r in rows]
    assert np.allclose(pred.pred_score, [float(r["score"]) for r in rows], rtol=1e-6, atol=0)


def test_calibrated_decisions_equal_score_alarm_rate(bottle, tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    shutil.copy(bottle / "runs" / "bottle" / "ckpt.pt", ckpt)
    data = bottle / "mvtec" / "bottle" / "test"
    cal = fm.calibrate(ckpt, data / "good", cfg=fm.ScoreConfig(K=2, T=2), device="cpu", log=lambda *_: None)
    A, folder = 0.4, data / "scratch"
    assert fm.main(["score", "--ckpt", str(ckpt), str(folder), "--out", str(tmp_path / "s"), "-K", "2", "-T", "2",
                    "--alarm-rate", str(A), "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s" / "scores.csv")))
    pred = fm.load(ckpt, "cpu").predict(folder, alarm_rate=A, K=2, T=2)
    n = len(cal["scores"])
    for i, row in enumerate(rows):
        p = (1 + sum(c >= pred.pred_score[i] for c in cal["scores"])) / (n + 1)  # by hand
        assert pred.p_value[i] == pytest.approx(p, abs=1e-12) == float(row["p_value"])
        assert int(pred.pred_label[i]) == int(row["anomalous"]) == int(p <= A)
        mask = np.asarray(Image.open(tmp_path / "s" / "masks" / fm.overlay_name(row["path"])))
        assert np.array_equal(mask == 255, pred.pred_mask[i])
        tau = sorted(cal["maxima"])[int(np.ceil((n + 1) * (1 - A))) - 1]
        assert np.array_equal(pred.pred_mask[i], pred.anomaly_map[i] > tau)


def test_an_alarm_rate_outside_0_1_is_refused_alike_from_python_and_the_cli(bottle, tmp_path, capsys):
    ckpt, folder = bottle / "runs" / "bottle" / "ckpt.pt", bottle / "mvtec" / "bottle" / "test" / "good"
    with pytest.raises(fm.UserError) as e:
        fm.load(ckpt, "cpu").predict(folder, alarm_rate=1.5)
    assert fm.main(["score", "--ckpt", str(ckpt), str(folder), "--out", str(tmp_path / "s"), "--alarm-rate", "1.5",
                    "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == f"flow_mismatch.py: error: {e.value}"
    assert "--alarm-rate" in str(e.value) and not (tmp_path / "s").exists()


def test_knob_kinds_are_explicit_and_tuples_are_checked_item_by_item():
    """Each knob's kind is explicit (the default's type, or `kind=`): a tuple knob's items keep it (a
    TypeError traceback once: 'a' >= 0), a tuple knob refuses one value and a one-value knob a tuple."""
    for bad, says in [(dict(betas=("a", 0.9)), "--betas: 'a' is not a number"), (dict(betas=0.9), "--betas: 0.9 is not a tuple"),
                      (dict(save_epochs=(1.5,)), "--save-epochs: 1.5 is not an integer"),
                      (dict(lr=True), "--lr: True is not a number"), (dict(steps="9"), "--steps: '9' is not an integer")]:
        with pytest.raises(fm.UserError, match=re.escape(says)):
            fm.TrainConfig(**bad)
    with pytest.raises(fm.UserError, match=re.escape("-K: (2, 3) is not one value")):
        fm.ScoreConfig(K=(2, 3))
    args = fm.build_parser().parse_args(["train", "--data", "d", "--betas", "0.8,0.9", "--save-epochs", "5,10"])
    assert args.betas == (0.8, 0.9) and args.save_epochs == (5, 10)


DOCS = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("doc", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_every_file_and_test_the_docs_name_exists(doc):
    """README.md and every docs/*.md (each linked from the README): each file and `file::test` they name
    exists, and no line numbers."""
    text, named, last = doc.read_text(), [], None
    source = r"[\w./-]+\.(?:py|sh|txt)|[\w/]*(?:README|BENCHMARKS)\.md"  # not the .md tables commands write
    for path, test, bare in re.findall(rf"`({source})(?:::(\w+))?`|`::(\w+)`", text):
        last = path or last
        named.append((last, test or bare))
    assert doc.name == "README.md" and len({p for p, _ in named}) > 20 or f"](docs/{doc.name})" in README
    for path, test in named:
        candidates = [ROOT / path] + [ROOT / d / path for d in ("tests", "theory", "toys")]
        found = [c for c in candidates if c.is_file()]
        assert found, path
        if test:
            assert re.search(rf"^def {test}\(", found[0].read_text(), re.M), f"{path}::{test}"
    assert not re.search(r"\bfirst \d+ lines|\blines? \d+", text)  # no line numbers to go stale
