"""Nothing runs that a file smuggles in: checkpoints are read as plain data and checked key by key."""

import os

import pytest
import torch

from conftest import run_cli
from test_errors import assert_user_error


class Payload:
    """Unpickling this calls os.system: a checkpoint built from it is what an attacker would share."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("command", ["test", "score"])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(trained, mvtec, tmp_path, command):
    marker = tmp_path / "pwned"
    ckpt = torch.load(trained, weights_only=True)
    ckpt["calibration"] = Payload(marker)
    torch.save(ckpt, tmp_path / "evil.pt")
    target = ("--data", mvtec) if command == "test" else (mvtec / "weave" / "test" / "good", "--category", "weave")
    r = run_cli(command, "--ckpt", tmp_path / "evil.pt", *target, "--out", tmp_path / "ev")
    assert_user_error(r, "--ckpt", "evil.pt", "could run code")
    assert not marker.exists()
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("damage, culprit", [
    (lambda c: c.pop("mean"), "'mean'"),
    (lambda c: c.pop("train_config"), "'train_config'"),
    (lambda c: c.update(step="7"), "'step'"),
    (lambda c: c["model_config"].update(wings=2), "wings"),
    (lambda c: c["model_config"].update(channel_mult="abc"), "'model_config'"),
    (lambda c: c.update(std=[1.0, 1.0]), "'std'"),
    (lambda c: c["model"].update({"extra.weight": torch.zeros(2)}), "'model'"),
])
def test_an_altered_checkpoint_is_one_line_naming_the_key(trained, mvtec, tmp_path, damage, culprit):
    ckpt = torch.load(trained, weights_only=True)
    damage(ckpt)
    torch.save(ckpt, tmp_path / "altered.pt")
    r = run_cli("test", "--ckpt", tmp_path / "altered.pt", "--data", mvtec, "--out", tmp_path / "ev")
    assert_user_error(r, "altered.pt", culprit)
