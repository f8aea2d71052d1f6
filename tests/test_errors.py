"""Bad input: one line naming the culprit, exit status 2, no traceback, nothing written damaged."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli


def assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert str(needle) in lines[0], lines[0]


def train(data, out, *extra):
    return run_cli("train", "--data", data, "--out", out, "--preset", "tiny", "--steps", 2, "--batch-size", 2,
                   "--image-size", 16, "--device", "cpu", *extra)


@pytest.fixture
def copy(mvtec, tmp_path):
    """A private copy of the generated dataset that a test may break."""
    dst = tmp_path / "data"
    shutil.copytree(mvtec, dst)
    return dst


def test_missing_data_folder(tmp_path):
    assert_user_error(train(tmp_path / "nope", tmp_path / "run"), "--data", "nope")
    assert not (tmp_path / "run").exists()


def test_root_without_categories(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(train(tmp_path / "empty", tmp_path / "run"), "--data", "empty")


def test_category_without_train_good(copy, tmp_path):
    shutil.rmtree(copy / "weave" / "train" / "good")
    assert_user_error(train(copy, tmp_path / "run"), "weave/train/good")


def test_empty_category(copy, tmp_path):
    for f in (copy / "grid" / "train" / "good").iterdir():
        f.unlink()
    assert_user_error(train(copy, tmp_path / "run"), "grid/train/good", "no images")


def test_corrupt_image_is_named(copy, tmp_path):
    bad = copy / "weave" / "train" / "good" / "003.png"
    bad.write_bytes(bad.read_bytes()[:40])
    assert_user_error(train(copy, tmp_path / "run"), "003.png", "corrupt")


def test_mask_of_another_size(copy, trained, tmp_path):
    mask = next((copy / "grid" / "ground_truth" / "stain").iterdir())
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(mask)
    assert_user_error(run_cli("test", "--ckpt", trained, "--data", copy, "--out", tmp_path / "ev", "-K", 1, "-T", 1),
                      mask.name, "9x7")
    assert not (tmp_path / "ev").exists()


def test_missing_mask_of_a_defect_image(copy, trained, tmp_path):
    mask = next((copy / "weave" / "ground_truth" / "scratch").iterdir())
    mask.unlink()
    assert_user_error(run_cli("test", "--ckpt", trained, "--data", copy, "--out", tmp_path / "ev", "-K", 1, "-T", 1),
                      "no mask", mask.name.replace("_mask", "").split(".")[0])


def test_image_size_not_a_multiple_of_the_downsampling(mvtec, tmp_path):
    r = run_cli("train", "--data", mvtec, "--out", tmp_path / "run", "--preset", "tiny", "--image-size", 18)
    assert_user_error(r, "--image-size", "multiple of 4", "20")


@pytest.mark.parametrize("flags, culprit", [
    (["--aggregator", "median"], "--aggregator"),
    (["--aggregator", "quantile:x"], "--aggregator"),
    (["--aggregator", "quantile:2"], "--aggregator"),
    (["-K", "0"], "-K"),
    (["-T", "-1"], "-T"),
    (["--weight", "t3"], "--weight"),
])
def test_bad_score_flags(trained, mvtec, tmp_path, flags, culprit):
    assert_user_error(run_cli("test", "--ckpt", trained, "--data", mvtec, "--out", tmp_path / "ev", *flags), culprit)
    assert not (tmp_path / "ev").exists()


def test_truncated_checkpoint(trained, mvtec, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(trained.read_bytes()[:1000])
    assert_user_error(run_cli("test", "--ckpt", broken, "--data", mvtec, "--out", tmp_path / "ev"), "--ckpt", "broken.pt")


def test_checkpoint_of_another_preset(trained, mvtec, tmp_path):
    ckpt = torch.load(trained, weights_only=True)
    ckpt["model_config"]["base_channels"] = 32  # claims another shape than its weights
    torch.save(ckpt, tmp_path / "other.pt")
    assert_user_error(run_cli("test", "--ckpt", tmp_path / "other.pt", "--data", mvtec, "--out", tmp_path / "ev"),
                      "--ckpt", "other.pt")


def test_not_a_checkpoint(mvtec, tmp_path):
    torch.save({"weights": 1}, tmp_path / "x.pt")
    assert_user_error(run_cli("test", "--ckpt", tmp_path / "x.pt", "--data", mvtec, "--out", tmp_path / "ev"),
                      "not a flow-mismatch checkpoint")


def test_out_is_an_existing_file(trained, mvtec, tmp_path):
    target = tmp_path / "taken.txt"
    target.write_text("keep me")
    assert_user_error(run_cli("test", "--ckpt", trained, "--data", mvtec, "--out", target), "--out", "taken.txt")
    assert target.read_text() == "keep me"
    assert_user_error(train(mvtec, target), "--out")
    assert target.read_text() == "keep me"


def test_train_refuses_to_overwrite_a_run(trained, mvtec):
    before = trained.read_bytes()
    assert_user_error(train(mvtec, trained.parent), "--resume")
    assert trained.read_bytes() == before


def test_test_category_absent_from_checkpoint(trained, visa, tmp_path):
    assert_user_error(run_cli("test", "--ckpt", trained, "--data", visa, "--out", tmp_path / "ev"), "candle")


def test_unknown_preset_and_flag_values(mvtec, tmp_path):
    assert_user_error(run_cli("train", "--data", mvtec, "--out", tmp_path / "r", "--preset", "huge"), "--preset")
    assert_user_error(run_cli("train", "--data", mvtec, "--out", tmp_path / "r", "--steps", "0"), "--steps")
    assert_user_error(run_cli("train", "--data", mvtec, "--out", tmp_path / "r", "--lr", "-1e-4"), "--lr")
    assert_user_error(run_cli("test", "--ckpt", "x"), "required")
    assert not (tmp_path / "r").exists()
