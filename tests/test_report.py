"""`test` writes report.html: every image it references exists, overlays come worst first (defects
the model found least, then its highest normals), are enlarged for the eye and shown at an image's
own resolution, their brightness ranks as H does, while the heatmaps behind the metrics keep the
model's size."""

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
        assert labels == sorted(labels, reverse=True)  # defects, then normal images
        n = labels.count(1)
        assert scores[:n] == sorted(scores[:n]) and scores[n:] == sorted(scores[n:], reverse=True)
    assert page.index("<table>") < page.index("defective images, lowest score first") < page.index(
        "normal images, highest score first")


def test_overlays_enlarged_heat_not(report):
    with Image.open(next((report / "weave" / "overlays").rglob("*.png"))) as im:
        assert im.height == 256 and im.width > 3 * 256  # 16^2 images, x16 nearest; three panels and a colour bar
    assert np.load(report / "weave" / "heatmaps.npz")["heat"].shape[1:] == (16, 16)


def luminance(rgb):
    return rgb[..., :3].astype(float) @ [0.2126, 0.7152, 0.0722]


def test_the_brightest_overlay_is_the_highest_heat(report):
    """The colour map's luminance rises with H, and across a category's overlays the brightest heat
    panel belongs to the image of the highest H (up to the colour range's top, where all are brightest)."""
    from matplotlib import colormaps

    ramp = luminance(colormaps[fm.COLOURS](np.linspace(0, 1, 256)) * 255)
    assert np.all(np.diff(ramp) > 0)
    saved = np.load(report / "weave" / "heatmaps.npz")
    heat = saved["heat"]
    hi = np.percentile(heat, 99.9)
    panel = slice(2 * 256 + 2 * 2, 3 * 256 + 2 * 2)  # image, gap, mask, gap, heat
    bright = [luminance(np.asarray(Image.open(report / "weave" / "overlays" / fm.overlay_name(p)))[:, panel]).max()
              for p in saved["paths"]]
    order = np.argsort(np.minimum(heat.reshape(len(heat), -1).max(1), hi), kind="stable")
    assert np.all(np.diff(np.asarray(bright)[order]) >= -1)  # uint8 colours: rounding


def test_an_overlay_shows_the_image_at_its_own_resolution_when_the_model_input_is_smaller(trained, tmp_path):
    data = fm.make_demo_dataset(tmp_path / "big", size=32, n_train=2, n_test=2)  # the model's input is 16^2
    out = tmp_path / "eval"
    fm.evaluate(trained, data, out, fm.ScoreConfig(K=1, T=1), "cpu", log=lambda *a: None)
    image = next((data / "weave" / "test" / "stain").glob("*.png"))
    mask = np.asarray(Image.open(data / "weave" / "ground_truth" / "stain" / image.name.replace(".png", "_mask.png")))
    with Image.open(out / "weave" / "overlays" / fm.overlay_name(image)) as im:
        strip = np.asarray(im.convert("RGB"))
    big = np.repeat(np.repeat(np.asarray(Image.open(image).convert("RGB")), 8, 0), 8, 1)  # 32 -> 256, nearest
    assert np.array_equal(strip[:, :256], big)
    assert np.array_equal(strip[:, 258:514, 0] > 0, np.repeat(np.repeat(mask > 0, 8, 0), 8, 1))
