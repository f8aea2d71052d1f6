"""Shared fixtures: tiny generated datasets in MVTec-AD and VisA layout, and a CLI runner."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flow_mismatch as fm  # noqa: E402


def run_cli(*args, timeout=600, env=None):
    """Run `python flow_mismatch.py ARGS` in a subprocess; returns CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / "flow_mismatch.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def mvtec(tmp_path_factory):
    """Two categories (weave, grid), 16x16 images, 8 train, 4 good + 4 defective test images each."""
    return fm.make_demo_dataset(tmp_path_factory.mktemp("mvtec") / "mvtec", size=16, n_train=8, n_test=4)


def write_visa(root: Path, size=20, seed=0):
    """VisA after the 1cls split: JPG images, test/{good,bad}, PNG masks named like the image."""
    rng = np.random.default_rng(seed)
    for sub, n in (("train/good", 6), ("test/good", 3), ("test/bad", 3)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = (rng.uniform(0.3, 0.6, (size, size, 3)) * 255).astype(np.uint8)
            if sub == "test/bad":
                mask = np.zeros((size, size), np.uint8)
                mask[4:9, 5:12] = 255
                img[mask > 0] = 250
                (root / "ground_truth/bad").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "ground_truth/bad" / f"{i:03d}.png")
            Image.fromarray(img).save(root / sub / f"{i:03d}.JPG", quality=95)
    return root


@pytest.fixture(scope="session")
def visa(tmp_path_factory):
    return write_visa(tmp_path_factory.mktemp("visa") / "candle")


@pytest.fixture(scope="session")
def trained(mvtec, tmp_path_factory):
    """A class-conditional tiny model trained for a few steps by the CLI."""
    run = tmp_path_factory.mktemp("run")
    r = run_cli("train", "--data", mvtec, "--out", run, "--preset", "tiny", "--steps", 6, "--batch-size", 4,
                "--image-size", 16, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return run / "ckpt.pt"


def periodic_texture(patch: np.ndarray, size: int, rng) -> np.ndarray:
    """A size x size texture: the patch mirrored into a seamless tile of twice its size, repeated,
    cut at a random phase, with a little pixel noise; floats in [0, 1]."""
    tile = np.concatenate([patch, patch[::-1]], 0)
    tile = np.concatenate([tile, tile[:, ::-1]], 1)
    reps = size // len(tile) + 2
    dy, dx = rng.integers(0, len(tile), 2)
    big = np.tile(tile, (reps, reps, 1))[dy:dy + size, dx:dx + size]
    return np.clip(big / 255 + rng.normal(0, 0.02, big.shape), 0, 1)


def write_highres(root: Path, size=192, n_train=40, n_test=12, seed=0) -> Path:
    """High-resolution inspection data in MVTec-AD layout from images that ship with scikit-learn:
    `fabric`, a periodic texture cut from flower.jpg, and `part`, an aligned disc of a texture cut
    from china.jpg on a dark background (placed to within 2 px). Defects are 2-8 px spots and short
    2 px scratches of another colour: under a pixel once the image is resized to a quarter."""
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    sources = {"fabric": load_sample_image("flower.jpg")[200:224, 300:324].astype(float),
               "part": load_sample_image("china.jpg")[150:166, 200:216].astype(float)}

    def normal(cat):
        img = periodic_texture(sources[cat], size, rng)
        if cat == "part":
            cy, cx = size / 2 + rng.uniform(-2, 2, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (0.4 * size) ** 2
            img = np.where(disc[..., None], img, 0.08 + rng.normal(0, 0.01, img.shape))
        return img

    def defect(img):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        if rng.uniform() < 0.5:  # a spot 2-8 px across
            r = rng.uniform(1, 4)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        else:  # a scratch 2 px wide, 6-8 px long
            a, half = rng.uniform(0, np.pi), rng.uniform(3, 4)
            along = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
            across = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
            mask = (np.abs(along) <= half) & (np.abs(across) <= 1)
        img[mask] = rng.uniform(0, 1, 3)
        return img, mask

    def write(path, arr):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(path)

    for cat in sources:
        for i in range(n_train):
            write(root / cat / "train" / "good" / f"{i:03d}.png", normal(cat))
        for i in range(n_test // 2):
            write(root / cat / "test" / "good" / f"{i:03d}.png", normal(cat))
            img, mask = defect(normal(cat))
            write(root / cat / "test" / "small" / f"{i:03d}.png", img)
            write(root / cat / "ground_truth" / "small" / f"{i:03d}_mask.png", mask.astype(float))
    return root
