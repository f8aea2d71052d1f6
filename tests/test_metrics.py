"""Metrics against scikit-learn and an independent slow AUPRO."""

import numpy as np
import pytest
from scipy.ndimage import label
from sklearn.metrics import roc_auc_score

import flow_mismatch as fm


def slow_aupro(masks, heat, limit=0.3):
    """Threshold by threshold: FPR over normal pixels, PRO as the mean over 8-connected regions of the
    covered fraction; trapezoid area from FPR 0 to `limit`, cut by linear interpolation, / limit."""
    regions = []
    for i, m in enumerate(masks):
        comp, n = label(m, structure=np.ones((3, 3)))
        regions += [(i, comp == r) for r in range(1, n + 1)]
    normal = masks == 0
    curve = [(0.0, 0.0)]
    for th in sorted(set(heat.ravel().tolist()), reverse=True):
        pred = heat >= th
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([(pred[i] & r).sum() / r.sum() for i, r in regions])
        curve.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


@pytest.mark.parametrize("seed", range(8))
def test_aupro_matches_slow_computation(seed):
    rng = np.random.default_rng(seed)
    n, h, w = rng.integers(1, 4), rng.integers(5, 12), rng.integers(5, 12)
    masks = (rng.random((n, h, w)) < 0.15).astype(np.uint8)
    masks[0, 1:3, 1:4] = 1  # at least one region
    heat = rng.random((n, h, w)) + 0.7 * masks
    if seed % 2:
        heat = np.round(heat, 1)  # ties between thresholds
    assert fm.aupro(masks, heat) == pytest.approx(slow_aupro(masks, heat), abs=1e-9)


def test_aupro_of_a_perfect_map_is_one_and_of_an_inverted_map_is_zero():
    masks = np.zeros((2, 10, 10), np.uint8)
    masks[0, 2:5, 2:5] = 1
    masks[1, 6:9, 1:3] = 1
    assert fm.aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    assert fm.aupro(masks, 1.0 - masks) == pytest.approx(0.0)


def test_f1_max_matches_brute_force():
    rng = np.random.default_rng(0)
    y, s = rng.integers(0, 2, 200), rng.random(200)
    best = 0.0
    for th in np.unique(s):
        p = s >= th
        tp = (p & (y == 1)).sum()
        if tp:
            best = max(best, 2 * tp / (p.sum() + (y == 1).sum()))
    assert fm.f1_max(y, s) == pytest.approx(best)


def test_evaluate_uses_every_pixel_of_every_image():
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 8, 8), np.uint8)
    masks[2, 2:4, 2:5] = 1
    masks[3, 5:7, 1:3] = 1
    heat = rng.random((4, 8, 8)) + masks
    labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.5, 0.4, 0.9])
    m = fm.compute_metrics(labels, scores, masks, heat)
    assert set(m) == set(fm.METRICS)
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), heat.ravel()))
    assert m["pixel_aupro"] == pytest.approx(slow_aupro(masks, heat))
