"""Split-conformal calibration: the false-alarm guarantee on simulated scores, a hold-out that
training never draws from, and train -> calibrate -> score/test --alarm-rate through the CLI."""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import flow_mismatch as fm
from conftest import run_cli
from test_bad_input import assert_user_error

# Scores of normal images under several continuous laws (no ties) and two discrete ones (ties).
CONTINUOUS = {
    "normal": lambda rng, shape: rng.normal(size=shape),
    "exponential": lambda rng, shape: rng.exponential(size=shape),
    "cauchy": lambda rng, shape: rng.standard_cauchy(size=shape),
    "lognormal": lambda rng, shape: rng.lognormal(0, 2, size=shape),
    "uniform": lambda rng, shape: rng.uniform(size=shape),
}
DISCRETE = {
    "poisson": lambda rng, shape: rng.poisson(2.0, size=shape).astype(float),
    "coin": lambda rng, shape: rng.integers(0, 2, size=shape).astype(float),
}
R, M = 2000, 100  # simulated calibration sets; new normal images per set
Z = 4.5  # Monte-Carlo tolerance in standard errors of the mean over the R sets


@st.composite
def sizes_and_rates(draw, n_max):
    """n calibration images and an alarm rate A in [1/(n+1), 0.3], the rates n images can certify."""
    n = draw(st.integers(9, n_max))
    return n, draw(st.floats(1 / (n + 1), 0.3))


def simulate(law, n, seed):
    """R exchangeable draws: n calibration scores and M new normal scores each."""
    rng = np.random.default_rng(seed)
    return law(rng, (R, n)), law(rng, (R, M))


def false_alarm_rates(calib, new, A):
    """Per calibration set: the fraction of its M new normal scores above tau_A."""
    return np.array([(s > fm.conformal_threshold(c, A)).mean() for c, s in zip(calib, new)])


def test_threshold_and_p_values_by_hand():
    calib = np.arange(1.0, 20.0)  # n = 19: p-values are multiples of 1/20
    # A = 0.1: floor(20 * 0.1) = 2 calibration scores may lie above tau, the 18th smallest
    assert fm.conformal_threshold(calib, 0.1) == 18.0
    assert fm.conformal_threshold(calib, 0.0999) == 19.0  # floor(1.998) = 1
    assert fm.conformal_threshold(calib, 0.05) == 19.0
    assert fm.p_values(calib, [18.5, 18.0, 0.0, 25.0]).tolist() == [2 / 20, 3 / 20, 1.0, 1 / 20]
    with pytest.raises(fm.UserError, match=r"1/\(n\+1\) = 0.05.*at least 24"):
        fm.conformal_threshold(calib, 0.04)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(law=st.sampled_from(sorted(CONTINUOUS)), nA=sizes_and_rates(200), seed=st.integers(0, 2**32 - 1))
def test_false_alarm_rate_lies_in_the_conformal_interval(law, nA, seed):
    """Continuous laws: the false-alarm rate averaged over calibration sets lies in
    [A - 1/(n+1), A], and equals floor((n+1) A) / (n+1) exactly (Beta mean), within Z s.e."""
    n, A = nA
    rates = false_alarm_rates(*simulate(CONTINUOUS[law], n, seed), A)
    mean, se = rates.mean(), rates.std(ddof=1) / math.sqrt(R)
    assert A - 1 / (n + 1) - Z * se <= mean <= A + Z * se, (mean, se)
    assert abs(mean - math.floor((n + 1) * A + 1e-12) / (n + 1)) <= Z * se, (mean, se)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(law=st.sampled_from(sorted(DISCRETE)), nA=sizes_and_rates(100), seed=st.integers(0, 2**32 - 1))
def test_false_alarm_rate_is_at_most_A_with_ties(law, nA, seed):
    n, A = nA
    rates = false_alarm_rates(*simulate(DISCRETE[law], n, seed), A)
    assert rates.mean() <= A + Z * rates.std(ddof=1) / math.sqrt(R)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(law=st.sampled_from(sorted(CONTINUOUS) + sorted(DISCRETE)), n=st.integers(4, 60),
       seed=st.integers(0, 2**32 - 1))
def test_p_values_of_normal_images_are_super_uniform(law, n, seed):
    """P(p <= k/(n+1)) <= k/(n+1) for every k, with equality for continuous laws; and p <= A
    decides exactly as s > tau_A."""
    calib, new = simulate({**CONTINUOUS, **DISCRETE}[law], n, seed)
    p = np.stack([fm.p_values(c, s) for c, s in zip(calib, new)])  # (R, M)
    for k in range(1, n + 1):
        u = k / (n + 1)
        per_set = (p <= u).mean(1)
        mean, se = per_set.mean(), per_set.std(ddof=1) / math.sqrt(R)
        assert mean <= u + Z * se, (k, mean, se)
        if law in CONTINUOUS:
            assert abs(mean - u) <= Z * se, (k, mean, se)
    for A in (1.5 / (n + 1), 0.25, 0.5):
        for c, s in zip(calib[:50], new[:50]):
            assert np.array_equal(fm.p_values(c, s) <= A, s > fm.conformal_threshold(c, A))


def test_held_out_images_are_never_drawn(tmp_path, monkeypatch):
    """Every batch of a run with calib_fraction 0.25 is decoded back to image indices: none is held out."""
    n = 24  # two categories of 12; floor(0.25 * 12) = 3 held out of each
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8, generator=gen)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # each image carries its index
    data = fm.Dataset(images, torch.arange(n) % 2, ["a", "b"], [f"img{i}" for i in range(n)])
    drawn, loss = [], fm.cfm_loss

    def spy(model, y, labels=None, generator=None):
        drawn.append(y[:, 0, 0, 0].clone())
        return loss(model, y, labels, generator)

    monkeypatch.setattr(fm, "cfm_loss", spy)
    cfg = fm.TrainConfig(preset="tiny", image_size=16, batch_size=4, steps=16, lr=1e-3, calib_fraction=0.25)
    ckpt = torch.load(fm.train(data, cfg, tmp_path, device="cpu", log=lambda *a: None), weights_only=True)
    mean, std = ckpt["mean"][0], ckpt["std"][0]
    ids = {round(v) for v in ((torch.cat(drawn) * std + mean) * 255).tolist()}
    held = {c: [int(Path(p).name[3:]) for p in rec["paths"]] for c, rec in ckpt["held_out"].items()}
    assert [len(held["a"]), len(held["b"])] == [3, 3]
    assert all(i % 2 == 0 for i in held["a"]) and all(i % 2 == 1 for i in held["b"])
    held_ids = set(held["a"] + held["b"])
    assert ids.isdisjoint(held_ids) and ids == set(range(n)) - held_ids  # all others were drawn
    train_ids = sorted(ids)
    assert ckpt["trained_on"] == fm.image_hashes(images[train_ids])
    for c in ("a", "b"):
        assert ckpt["calibration"][c]["paths"] == [str(Path(f"img{i}").resolve()) for i in held[c]]
        assert len(ckpt["calibration"][c]["scores"]) == len(ckpt["calibration"][c]["maxima"]) == 3
    # the same seed and fraction hold out the same images
    again = fm.split_calibration(data, 0.25, cfg.seed)[1].paths
    assert sorted(str(Path(p).resolve()) for p in again) == sorted(p for c in "ab" for p in ckpt["calibration"][c]["paths"])


# ---- end to end through the CLI: one category, 24 normal training images, half held out

@pytest.fixture(scope="module")
def line(tmp_path_factory):
    root = tmp_path_factory.mktemp("line")
    data = fm.make_demo_dataset(root / "data", size=16, n_train=24, n_test=6) / "weave"
    r = run_cli("train", "--data", data, "--out", root / "run", "--preset", "tiny", "--steps", 4,
                "--batch-size", 4, "--image-size", 16, "--calib-fraction", 0.5, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "12 more held out for calibration" in r.stderr
    return data, root / "run" / "ckpt.pt"


def test_score_writes_p_values_decisions_and_masks(line, tmp_path):
    data, ckpt_path = line
    A = 0.3
    r = run_cli("score", "--ckpt", ckpt_path, data / "test" / "stain", "--out", tmp_path / "o", "--alarm-rate", A,
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    cal = torch.load(ckpt_path, weights_only=True)["calibration"]["weave"]
    n = len(cal["scores"])
    assert n == 12 and cal["rule"]["K"] == 10
    rows = list(csv.DictReader(open(tmp_path / "o" / "scores.csv")))
    assert list(rows[0]) == ["path", "score", "p_value", "anomalous"] and len(rows) == 3
    for row in rows:
        s = float(row["score"])
        p = (1 + sum(c >= s for c in cal["scores"])) / (n + 1)
        assert float(row["p_value"]) == pytest.approx(p, abs=1e-12)
        assert int(row["anomalous"]) == int(p <= A)
    # masks: heat > the ceil((n+1)(1-A))-th smallest heatmap maximum, recomputed here
    tau = sorted(cal["maxima"])[math.ceil((n + 1) * (1 - A)) - 1]
    detector = fm.load(ckpt_path, "cpu")
    ckpt, model = detector.ckpt, detector.model
    files = [data / "test" / "stain" / f"{i:03d}.png" for i in range(3)]
    images = torch.from_numpy(np.stack([fm.read_image(f, 16)[0] for f in files])).permute(0, 3, 1, 2)
    heat, _ = fm.score_dataset(model, fm.Dataset(images, torch.zeros(3, dtype=torch.long), [], files),
                               fm.ScoreConfig(), torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"]), "cpu")
    for f, h in zip(files, heat.numpy()):
        mask = np.asarray(Image.open(tmp_path / "o" / "masks" / fm.overlay_name(f)))
        assert set(np.unique(mask)) <= {0, 255} and mask.shape == (16, 16)
        assert np.array_equal(mask == 255, h > tau)


def test_test_reports_the_operating_point(line, tmp_path):
    data, ckpt_path = line
    A = 0.25
    r = run_cli("test", "--ckpt", ckpt_path, "--data", data, "--out", tmp_path / "e", "--alarm-rate", A,
                "--no-overlays", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())["weave"]
    cal = torch.load(ckpt_path, weights_only=True)["calibration"]["weave"]
    tau = sorted(cal["scores"])[math.ceil((len(cal["scores"]) + 1) * (1 - A)) - 1]
    rows = list(csv.DictReader(open(tmp_path / "e" / "weave" / "scores.csv")))
    for label, key in ((0, "false_alarm_rate"), (1, "detection_rate")):
        flags = [float(row["score"]) > tau for row in rows if int(row["label"]) == label]
        assert m[key] == pytest.approx(sum(flags) / len(flags))
    assert set(fm.OPERATING) <= set(m)
    assert "false_alarm_rate" in (tmp_path / "e" / "table.md").read_text()


def test_operating_point_without_ground_truth_has_no_pixel_numbers():
    """A folder without masks: image rates are computed, pixel precision and recall are None (not 0)."""
    cal = dict(scores=list(np.arange(1.0, 20.0)), maxima=list(np.arange(1.0, 20.0)))
    heat = np.zeros((4, 8, 8))
    heat[:, 0, 0] = [0.0, 30.0, 0.0, 30.0]  # images 1 and 3 flag a pixel
    m = fm.operating_point(cal, 0.1, np.array([0.0, 30.0, 0.0, 30.0]), np.array([0, 0, 1, 1]), heat, None)
    assert m == dict(false_alarm_rate=0.5, detection_rate=0.5, pixel_precision=None, pixel_recall=None)
    gt = np.zeros((4, 8, 8), np.uint8)
    gt[3, 0, 0] = 1
    m = fm.operating_point(cal, 0.1, np.array([0.0, 30.0, 0.0, 30.0]), np.array([0, 0, 1, 1]), heat, gt)
    assert (m["pixel_precision"], m["pixel_recall"]) == (0.5, 1.0)


def test_calibrate_refuses_training_images_and_stores_a_new_calibration(line, tmp_path):
    data, ckpt_path = line
    ckpt = tmp_path / "ckpt.pt"
    shutil.copy(ckpt_path, ckpt)
    held = set(torch.load(ckpt, weights_only=True)["held_out"]["weave"]["paths"])
    trained = next(p for p in sorted((data / "train" / "good").iterdir()) if str(p.resolve()) not in held)
    fresh = tmp_path / "fresh"
    shutil.copytree(data / "test" / "good", fresh)
    shutil.copy(trained, fresh / "renamed.png")  # a training image under another name
    before = ckpt.read_bytes()
    assert_user_error(run_cli("calibrate", "--ckpt", ckpt, "--data", fresh, "--device", "cpu"),
                      "--data", "1 of 7 images were used to train", "renamed.png")
    assert ckpt.read_bytes() == before
    (fresh / "renamed.png").unlink()
    r = run_cli("calibrate", "--ckpt", ckpt, "--data", fresh, "-K", 2, "-T", 2, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    cal = torch.load(ckpt, weights_only=True)["calibration"]["weave"]
    assert len(cal["scores"]) == 6 and cal["rule"]["K"] == 2 and all("fresh" in p for p in cal["paths"])
    # under the calibration's rule the same images score again exactly as recorded: a score is a function
    # of the image alone (its noise from (seed, path)), so calibration and score agree image by image
    r = run_cli("score", "--ckpt", ckpt, fresh, "--out", tmp_path / "s", "--alarm-rate", 0.5, "-K", 2, "-T", 2)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(tmp_path / "s" / "scores.csv")))
    assert [row["path"] for row in rows] == cal["paths"]
    assert [float(row["score"]) for row in rows] == pytest.approx(cal["scores"], rel=1e-5)
    # scoring under another rule than the calibration's is refused
    assert_user_error(run_cli("score", "--ckpt", ckpt, fresh, "--out", tmp_path / "o", "--alarm-rate", 0.5),
                      "--alarm-rate", "-K 2")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("rate,needles", [("0", ["--alarm-rate", "must be > 0 and < 1, got 0.0"]),
                                          ("1.5", ["--alarm-rate", "must be > 0 and < 1, got 1.5"]),
                                          ("0.05", ["--alarm-rate", "1/(n+1) = 0.0769", "at least 19"])])
def test_bad_alarm_rate(line, tmp_path, rate, needles):
    data, ckpt_path = line
    assert_user_error(run_cli("score", "--ckpt", ckpt_path, data / "test" / "good", "--out", tmp_path / "o",
                              "--alarm-rate", rate), *needles)
    assert not (tmp_path / "o").exists()


def test_a_model_without_calibration_is_told_what_to_do(line, tmp_path):
    data, ckpt_path = line
    ckpt = torch.load(ckpt_path, weights_only=True)
    del ckpt["calibration"]
    torch.save(ckpt, tmp_path / "bare.pt")
    assert_user_error(run_cli("score", "--ckpt", tmp_path / "bare.pt", data / "test" / "good", "--out",
                              tmp_path / "o", "--alarm-rate", 0.1), "no calibration", "--calib-fraction", "calibrate")
    assert not (tmp_path / "o").exists()


def test_false_alarm_rate_holds_frame_by_frame(trained, tmp_path):
    """The guarantee as a line uses it: normal images scored by calibrate, and fresh frames scored
    one predict call each. Both give an image the same score (the noise rule), and over R random
    splits of the 120 images into n = 19 calibration images and one new frame the frame's
    p-value is <= A at the rate floor((n + 1) A) / (n + 1) = 0.1 exactly: given the images, the
    frame's rank among the n + 1 is uniform. So the count of alarms is Binomial(R, 0.1); checked
    within Z standard errors."""
    root = fm.make_demo_dataset(tmp_path / "fresh", size=16, n_train=120, n_test=0, seed=11)
    data = fm.load_train(root / "weave", 16)
    detector, cfg, n, A, runs = fm.load(trained, "cpu"), fm.ScoreConfig(K=2, T=2), 19, 0.1, 4000
    label = detector.categories.index("weave")
    calib = np.array(fm.calibrate_on(detector.model, data, cfg, detector.mean, detector.std, detector.device, label,
                                     detector.ckpt["step"])["scores"])
    frames = np.array([detector.predict(x.permute(1, 2, 0).numpy(), "weave", K=2, T=2).pred_score[0]
                       for x in data.images])  # one call per frame
    np.testing.assert_allclose(frames, calib, rtol=1e-5)
    rng = np.random.default_rng(0)
    alarms = 0
    for _ in range(runs):
        pick = rng.choice(len(data), n + 1, replace=False)
        alarms += bool(fm.p_values(calib[pick[:n]], frames[pick[n:]])[0] <= A)
    expected = math.floor((n + 1) * A + 1e-12) / (n + 1)
    assert abs(alarms / runs - expected) <= Z * math.sqrt(expected * (1 - expected) / runs), alarms / runs
