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
