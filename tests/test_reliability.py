"""Interrupted training loses nothing: atomic checkpoints, exact resume, signals, numerical faults."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import flow_mismatch as fm
from conftest import ROOT, run_cli


def small_cfg(**kw):
    return fm.TrainConfig(preset="tiny", image_size=16, batch_size=4, lr=1e-3, save_every=2, **kw)


def test_resumed_run_gives_the_same_weights_as_an_uninterrupted_one(mvtec, tmp_path):
    data = fm.load_train(mvtec, 16)
    fm.train(data, small_cfg(steps=6), tmp_path / "full", "cpu", log=lambda *_: None)
    fm.train(data, small_cfg(steps=3), tmp_path / "half", "cpu", log=lambda *_: None)
    assert torch.load(tmp_path / "half" / "ckpt.pt", weights_only=True)["step"] == 3
    fm.train(data, small_cfg(steps=6), tmp_path / "half", "cpu", resume=True, log=lambda *_: None)
    a = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "half" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        for k in ("m", "v", "v_max"):  # Adam moments and the AMSGrad maximum
            assert torch.equal(s[k], b["optimizer"]["state"][i][k]), (i, k)


def test_resume_through_the_cli_continues_the_step_count(mvtec, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--data", mvtec, "--out", run, "--preset", "tiny", "--steps", 2, "--batch-size", 2,
                "--image-size", 16, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    r = run_cli("train", "--resume", run, "--steps", 4)  # data, preset and size come from the checkpoint
    assert r.returncode == 0, r.stderr
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 4


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    fm.save_checkpoint(path, {"step": 1})

    def dies_midway(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fm.torch, "save", dies_midway)
    with pytest.raises(fm.UserError, match="No space left"):
        fm.save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temp file left behind


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(mvtec, tmp_path, monkeypatch):
    data = fm.load_train(mvtec, 16)
    out = tmp_path / "run"
    out.mkdir()
    fm.train(data, small_cfg(steps=2), out, "cpu", log=lambda *_: None)
    before = (out / "ckpt.pt").read_bytes()

    def full(obj, f):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fm.torch, "save", full)
    with pytest.raises(fm.UserError, match="No space left"):
        fm.train(data, small_cfg(steps=4), out, "cpu", resume=True, log=lambda *_: None)
    assert (out / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_exits_with_one_line(mvtec, tmp_path, sig):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-u", str(ROOT / "flow_mismatch.py"), "train", "--data", str(mvtec),
                          "--out", str(run), "--preset", "tiny", "--steps", "100000", "--batch-size", "2",
                          "--image-size", "16", "--save-every", "100000", "--device", "cpu"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "parameters" in p.stderr.readline()  # training has started
    time.sleep(2)
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err
    message = [line for line in (out + err).splitlines() if "interrupted" in line]
    assert len(message) == 1 and "--resume" in message[0]
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert 0 < ckpt["step"] < 100000 and ckpt["step"] == int(message[0].split(" at step ")[1].split("/")[0])


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(mvtec, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--data", mvtec, "--out", run, "--preset", "tiny", "--steps", 50, "--batch-size", 2,
                "--image-size", 16, "--save-every", 1, "--lr", "1e3", "--device", "cpu")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    line = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(line) == 1 and "non-finite loss" in line[0] and "at step" in line[0]
    bad_step = int(line[0].split("at step ")[1].split(";")[0])
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_torchrun_trains_on_two_processes(mvtec, tmp_path):
    run = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(29500 + os.getpid() % 1000), str(ROOT / "flow_mismatch.py"), "train", "--data", str(mvtec),
                        "--out", str(run), "--preset", "tiny", "--steps", "3", "--batch-size", "2", "--image-size",
                        "16", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and "x2" in r.stderr


def test_torchrun_scoring_gathers_the_same_heatmaps(trained, mvtec, tmp_path):
    one = run_cli("test", "--ckpt", trained, "--data", mvtec, "--out", tmp_path / "one", "-K", 2, "-T", 2,
                  "--no-overlays", "--device", "cpu")
    assert one.returncode == 0, one.stderr
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(30500 + os.getpid() % 1000), str(ROOT / "flow_mismatch.py"), "test", "--ckpt", str(trained),
                        "--data", str(mvtec), "--out", str(tmp_path / "two"), "-K", "2", "-T", "2", "--no-overlays",
                        "--device", "cpu"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    import numpy as np

    for cat in ("grid", "weave"):
        a = np.load(tmp_path / "one" / cat / "heatmaps.npz")
        b = np.load(tmp_path / "two" / cat / "heatmaps.npz")
        assert np.allclose(a["heat"], b["heat"], rtol=1e-5, atol=1e-7)
