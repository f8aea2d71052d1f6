"""`test` writes report.html: every image it references exists, overlays come worst first and
are enlarged for the eye while the heatmaps behind the metrics keep the model's size."""

import csv
import re

import numpy as np
import pytest
from PIL import Image

import flow_mismatch as fm


@pytest.fixture(scope="module")
def report(trained, mvtec, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    fm.evaluate(trained, mvtec, out, fm.ScoreConfig(K=2, T=2), "cpu", log=lambda *a: None)
    return out


def test_every_referenced_image_exists(report):
    page = (report / "report.html").read_text()
    srcs = re.findall(r"<img src='([^']+)'", page)
    assert len(srcs) == 2 + 2 * 8  # curves per category, one overlay per test image
    for src in srcs:
        assert (report / src).is_file(), src
    for cat in ("weave", "grid"):
        assert f"report/{cat}.png" in srcs
        assert f"<th>{cat}</th>" in page


def test_overlays_worst_first(report):
    page = (report / "report.html").read_text()
    for cat in ("weave", "grid"):
        with open(report / cat / "scores.csv") as f:
            rows = list(csv.DictReader(f))
        shown = re.findall(rf"src='{cat}/overlays/([^']+)'", page)
        name = {fm.overlay_name(r["path"]): r for r in rows}
        scores = [float(name[s]["score"]) for s in shown]
        labels = [int(name[s]["label"]) for s in shown]
        assert labels == sorted(labels)  # normal images, then defects
        n = labels.count(0)
        assert scores[:n] == sorted(scores[:n], reverse=True) and scores[n:] == sorted(scores[n:])


def test_overlays_enlarged_heat_not(report):
    with Image.open(next((report / "weave" / "overlays").rglob("*.png"))) as im:
        assert im.size == (3 * 256, 256)  # 16^2 images, three panels, x16 nearest
    assert np.load(report / "weave" / "heatmaps.npz")["heat"].shape[1:] == (16, 16)
