"""Loaders for the MVTec-AD and VisA (1cls) folder layouts."""

import numpy as np
import pytest
import torch
from PIL import Image

import flow_mismatch as fm
from conftest import write_visa


def test_mvtec_root_loads_every_category(mvtec):
    train = fm.load_train(mvtec, 16)
    assert train.class_names == ["grid", "weave"]
    assert train.images.shape == (16, 3, 16, 16) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0] * 8 + [1] * 8
    tests = fm.load_test(mvtec, 16)
    assert set(tests) == {"grid", "weave"}
    for data in tests.values():
        assert len(data) == 8 and data.anomalous.sum() == 4
        assert data.masks.shape == (8, 16, 16) and set(np.unique(data.masks)) <= {0, 1}
        good = np.array(["/good/" in p for p in data.paths])
        assert data.masks[good].sum() == 0 and all(m.sum() > 0 for m in data.masks[~good])


def test_single_category_folder_is_one_category(mvtec):
    assert fm.load_train(mvtec / "weave", 16).class_names == ["weave"]


def test_visa_layout_with_jpg_images_and_png_masks(visa):
    train = fm.load_train(visa, 20)
    assert train.class_names == ["candle"] and len(train) == 6
    data = fm.load_test(visa, 20)["candle"]
    assert data.anomalous.tolist() == [1, 1, 1, 0, 0, 0]  # bad/ sorts before good/
    assert data.masks[:3].sum(axis=(1, 2)).tolist() == [35, 35, 35]  # the 5x7 defect, same size
    assert data.masks[3:].sum() == 0


def test_grayscale_and_rgba_images_are_converted(tmp_path):
    folder = tmp_path / "gray" / "train" / "good"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((12, 12), 200, np.uint8), "L").save(folder / "a.png")
    Image.fromarray(np.full((12, 12, 4), 100, np.uint8), "RGBA").save(folder / "b.png")
    data = fm.load_train(tmp_path / "gray", 8)
    assert data.images.shape == (2, 3, 8, 8)
    assert data.images[0].unique().tolist() == [200] and data.images[1].unique().tolist() == [100]


def test_masks_are_resized_with_nearest_neighbour(tmp_path):
    root = write_visa(tmp_path / "c", size=20)
    data = fm.load_test(root, 8)["c"]
    assert set(np.unique(data.masks)) == {0, 1}


def test_normalisation_is_per_channel_mean_and_std(mvtec):
    data = fm.load_train(mvtec, 16)
    mean, std = data.normalisation()
    x = data.images.double() / 255
    for c in range(3):
        assert mean[c].item() == pytest.approx(x[:, c].mean().item(), rel=1e-6)
        assert std[c].item() == pytest.approx(x[:, c].std().item(), rel=1e-6)
