"""Reproduction: the baseline scorers against hand computations, the ablation sweeps against a
plain `test`, `compare`, the new flags' bad input, and `reproduce.sh --quick` end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

import flow_mismatch as fm
from conftest import ROOT, run_cli


class Oracle(torch.nn.Module):
    """v(x, t) = (y - x) / (1 - t): the exact velocity of the straight path through x to y, so
    every reconstruction of y is perfect."""

    def __init__(self, y):
        super().__init__()
        self.y = y

    def forward(self, x, t, labels=None):
        K = len(x) // len(self.y)
        return (self.y.repeat(K, 1, 1, 1) - x) / (1 - t.view(-1, 1, 1, 1))


class Zero(torch.nn.Module):
    def forward(self, x, t, labels=None):
        return torch.zeros_like(x)


@pytest.fixture
def y():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def noises(cfg, y):
    return torch.stack([fm.path_noise(cfg.seed, [0, 0], k, y.shape[1:], y.device) for k in range(cfg.K)])


@pytest.mark.parametrize("score", ["recon", "onestep"])
def test_baselines_vanish_for_a_perfect_model(y, score):
    cfg = fm.ScoreConfig(K=3, t0=0.3, ode_steps=4, score=score, max_batch=8)
    heat = fm.SCORERS[score](Oracle(y), y, None, cfg)
    assert heat.shape == (2, 8, 8)
    assert heat.abs().max() < 1e-4


def test_recon_of_a_zero_velocity_is_the_noisy_image(y):
    """v = 0 leaves y_t0 in place: h = (1 - t0) ||y - x0|| (Eq. 29), minimum over the K paths."""
    cfg = fm.ScoreConfig(K=3, t0=0.3, ode_steps=2, score="recon", max_batch=8)
    want = ((1 - cfg.t0) * (y - noises(cfg, y)).square().sum(2).sqrt()).min(0).values
    torch.testing.assert_close(fm.recon_heat(Zero(), y, None, cfg), want)


def test_onestep_adds_the_sobel_term_computed_by_scipy(y):
    """v = 0: y_hat = y_t0, d = (1 - t0)(y - x0); h = ||d|| + ||Sobel d|| (scipy, edges replicated)."""
    cfg = fm.ScoreConfig(K=2, t0=0.6, score="onestep", aggregator="mean", max_batch=8)
    d = ((1 - cfg.t0) * (y - noises(cfg, y))).numpy()  # (K, B, C, H, W)
    grad = np.stack([[ndimage.sobel(img, axis=a, mode="nearest") / 8 for img in d.reshape(-1, 8, 8)]
                     for a in (-1, -2)]).reshape(2, *d.shape)
    want = np.sqrt((d**2).sum(2)) + np.sqrt((grad**2).sum((0, 3)))
    torch.testing.assert_close(fm.onestep_heat(Zero(), y, None, cfg), torch.from_numpy(want.mean(0)).float())


def test_sweep_rows_equal_plain_tests(trained, mvtec, tmp_path):
    base = fm.ScoreConfig(K=2, T=2, ode_steps=2)
    rows = fm.run_sweep([trained], mvtec, tmp_path / "sweep", base, {"score": ("mismatch", "recon"), "T": (1, 2)},
                        "cpu", log=lambda *a: None)
    assert [r["setting"] for r in rows] == [dict(score=s, T=t) for s in ("mismatch", "recon") for t in (1, 2)]
    for r in rows[1:3]:
        plain = fm.evaluate(trained, mvtec, tmp_path / "plain", fm.replace(base, **r["setting"]), "cpu",
                            overlays=False, log=lambda *a: None)
        assert r["results"][fm.MEAN].pop("categories") == plain[fm.MEAN].pop("categories")
        for name, metrics in plain.items():
            assert r["results"][name] == pytest.approx(metrics, nan_ok=True)
    lines = (tmp_path / "sweep" / "sweep.md").read_text().splitlines()
    assert lines[0].startswith("| score | T | image_auroc") and lines[0].endswith("| images/s |")
    assert [line.split(" | ")[:2] for line in lines[2:]] == [["| mismatch", "1"], ["| mismatch", "2"],
                                                              ["| recon", "1"], ["| recon", "2"]]


def test_several_checkpoints_give_a_row_each(trained, mvtec, tmp_path):
    r = run_cli("test", "--ckpt", trained, "--ckpt", trained, "--data", mvtec, "--out", tmp_path, "-K", 1, "-T", 1,
                "--device", "cpu")
    assert r.returncode == 0, r.stderr
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [row["setting"] for row in rows] == [dict(ckpt=str(trained))] * 2
    assert rows[0]["results"] == rows[1]["results"]


def test_compare_puts_the_papers_numbers_beside_ours(tmp_path):
    ours = dict.fromkeys(fm.METRICS, 0.9)
    (tmp_path / "metrics.json").write_text(json.dumps({"bottle": ours, "mystery": ours, fm.MEAN: ours}))
    r = run_cli("compare", tmp_path / "metrics.json", "--dataset", "mvtec")
    assert r.returncode == 0, r.stderr
    rows = (tmp_path / "compare_mvtec.md").read_text().splitlines()[2:]
    assert [row.split(" | ")[:2] for row in rows] == [["| bottle", l] for l in ("ours", "paper", "ours - paper")] + \
        [["| mean", l] for l in ("ours (1/15, +1 other)", "paper", "ours - paper")]  # not the paper's 15
    assert rows[1] == "| bottle | paper | 99.1 | 99.7 | 97.6 | 97.8 | 76.8 | 69.9 | 93.0 |"
    assert rows[5].startswith("| mean | ours - paper | -8.7 | -9.5 | -7.7 | -7.7 | 22.5 |")


@pytest.mark.parametrize("flags, needle", [
    (["--grid-K", "0,x"], "--grid-K"),
    (["--grid-T", "2,0"], "--grid-T"),
    (["--score", "foo"], "--score"),
    (["--scores", "mismatch,foo"], "--scores"),
    (["--aggregators", "min,quantile:0"], "--aggregators"),
    (["--weights", "1,t3"], "--weights"),
    (["--t0", "1"], "--t0"),
    (["--ode-steps", "0"], "--ode-steps"),
    (["--precision", "fp16"], "--precision"),
])
def test_bad_ablation_flags(trained, mvtec, tmp_path, flags, needle):
    r = run_cli("test", "--ckpt", trained, "--data", mvtec, "--out", tmp_path / "out", *flags)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert needle in r.stderr
    assert not (tmp_path / "out").exists()


def test_reproduce_quick_writes_every_table(tmp_path):
    out = tmp_path / "repro"
    r = subprocess.run(["bash", str(ROOT / "reproduce.sh"), "--quick"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OUT": str(out), "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr[-2000:]

    def first_column(path):
        lines = (out / path).read_text().splitlines()
        assert lines[0].endswith("| pixel_aupro |") or lines[0].endswith("| images/s |"), lines[0]
        return [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]

    runs = out / "runs" / "demo"
    assert first_column("table1/demo/table.md") == ["grid", "weave", "mean"]
    assert first_column("table1/demo/compare_mvtec.md") == ["grid"] * 3 + ["mean"] * 3
    assert first_column("table2/sweep.md") == list(fm.SCORERS)
    assert first_column("table6/sweep.md") == [str(k) for k in (1, 2, 3) for _ in (1, 2, 3)]
    assert first_column("table7/demo/sweep.md") == ["mean", "quantile:0.3", "quantile:0.2", "quantile:0.1", "min"]
    assert first_column("table8/demo/sweep.md") == [str(out / "runs" / "demo-pooled" / "ckpt.pt"), str(runs / "ckpt.pt")]
    assert first_column("table9/sweep.md") == [str(runs / f"ckpt_epoch{e}.pt") for e in (5, 10, 20)]
    assert first_column("weights/sweep.md") == list(fm.WEIGHTS)
    # The default setting (K = T = 3, min, t^2, conditional, last epoch) is one row of every ablation.
    default = (out / "table1/demo/table.md").read_text().splitlines()[-1].split(" | ")[1:]
    for path, row in (("table6/sweep.md", -1), ("table8/demo/sweep.md", -1), ("table9/sweep.md", -1),
                      ("weights/sweep.md", 4), ("table2/sweep.md", 2)):
        cells = (out / path).read_text().splitlines()[row].split(" | ")
        assert cells[-8:-1] == [c.rstrip(" |") for c in default][-7:], path
