"""Outputs are safe and failures are clean: one train per run folder, outputs checked before any
work, nothing written outside --out, collision-free names replaced as a whole, `score` survives a
bad file, every flag range-checked, one line on interrupt, truthful messages, a CPU estimate."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import flow_mismatch as fm
from conftest import ROOT

TINY = ["--preset", "tiny", "--batch-size", "2", "--image-size", "16", "--device", "cpu"]


def cli(argv, capsys):
    """In-process `flow_mismatch.py ARGV` -> (exit status, stderr lines); a traceback fails the test."""
    try:
        rc = fm.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


def said(err):
    """The warning and error lines among stderr's (progress lines, `... img/s  eta ...`, aside)."""
    return [line for line in err if line.startswith("flow_mismatch.py:") and "img/s" not in line]


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def single(mvtec, tmp_path_factory):
    """An unconditional model of one category (weave)."""
    run = tmp_path_factory.mktemp("single")
    cfg = fm.TrainConfig(preset="tiny", image_size=16, batch_size=2, steps=2)
    return fm.train(fm.load_train(mvtec / "weave", 16), cfg, run, "cpu", log=lambda *_: None)


# 1. One run per folder --------------------------------------------------------------------------

def test_a_second_train_on_a_busy_folder_exits_2_naming_it_and_the_holder(mvtec, tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-u", str(ROOT / "flow_mismatch.py"), "train", "--data", str(mvtec),
                              "--out", str(run), "--steps", "100000", "--save-every", "1", *TINY],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert "parameters" in first.stderr.readline()  # training has begun
        for argv in (["train", "--data", mvtec, "--out", run, "--steps", 1, *TINY], ["train", "--resume", run]):
            rc, err = cli(argv, capsys)
            assert rc == 2 and len(err) == 1, err
            assert str(run) in err[0] and f"pid {first.pid}" in err[0], err[0]
        while not (run / "ckpt.pt").exists():
            time.sleep(0.1)
    finally:
        first.kill()  # SIGKILL: the OS drops the lock with the process
        first.wait()
    step = torch.load(run / "ckpt.pt", weights_only=True)["step"]
    rc, err = cli(["train", "--resume", run, "--steps", step + 1], capsys)
    assert rc == 0, err
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == step + 1


# 2. Check before work ---------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() == 0, reason="running as root, which writes into read-only folders, so the OS "
                                              "cannot make one here; the table below checks --out under a file")
def test_a_read_only_folder_is_refused_before_any_work(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:  # a missing checkpoint and data folder: had they been read first, they would be named
        for argv in (["train", "--data", tmp_path / "none", "--out", ro / "run"],
                     ["test", "--ckpt", tmp_path / "none.pt", "--data", tmp_path / "none", "--out", ro / "ev"],
                     ["score", "--ckpt", tmp_path / "none.pt", tmp_path / "none", "--out", ro / "sc"]):
            rc, err = cli(argv, capsys)
            assert rc == 2 and len(err) == 1 and "--out" in err[0] and "cannot be written" in err[0], err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# 3. Nothing escapes --out -----------------------------------------------------------------------

def test_data_dot_names_the_folder_and_nothing_is_written_outside_out(mvtec, tmp_path, monkeypatch, capsys):
    cat = tmp_path / "weave"
    shutil.copytree(mvtec / "weave", cat)
    monkeypatch.chdir(cat)
    rc, err = cli(["train", "--data", ".", "--out", tmp_path / "run", "--steps", 2, *TINY], capsys)
    assert rc == 0, err
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["class_names"] == ["weave"]
    monkeypatch.chdir(cat / "test")
    before = files_under(tmp_path)
    rc, err = cli(["test", "--ckpt", tmp_path / "run" / "ckpt.pt", "--data", "..", "--out", tmp_path / "ev",
                   "-K", 1, "-T", 1], capsys)
    assert rc == 0, err
    assert [p.parent.name for p in (tmp_path / "ev").glob("*/scores.csv")] == ["weave"]
    assert [f for f in files_under(tmp_path) if not f.startswith("ev")] == before


# 4. Names that cannot collide; a rerun replaces a category's outputs as a whole ------------------

def test_same_stem_images_get_their_own_overlays_and_a_rerun_leaves_no_old_ones(trained, mvtec, tmp_path, capsys):
    src = mvtec / "grid" / "test" / "good"
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(src / "000.png", imgs / "a.png")
    Image.open(src / "001.png").convert("RGB").save(imgs / "a.jpg")
    shutil.copy(src / "002.png", imgs / "b.png")
    argv = ["score", "--ckpt", trained, imgs, "--out", tmp_path / "sc", "--category", "grid", "-K", 1, "-T", 1]
    assert cli(argv, capsys)[0] == 0
    assert files_under(tmp_path / "sc" / "heatmaps") == ["imgs", "imgs/a.jpg.png", "imgs/a.png.png", "imgs/b.png.png"]
    (imgs / "b.png").unlink()
    assert cli(argv, capsys)[0] == 0
    assert files_under(tmp_path / "sc" / "heatmaps") == ["imgs", "imgs/a.jpg.png", "imgs/a.png.png"]


def test_a_rerun_of_test_replaces_the_category_folder(trained, mvtec, tmp_path, capsys):
    argv = ["test", "--ckpt", trained, "--data", mvtec, "--out", tmp_path / "ev", "-K", 1, "-T", 1]
    assert cli(argv, capsys)[0] == 0
    stale = tmp_path / "ev" / "grid" / "overlays" / "stale.png"
    stale.write_bytes(b"from an earlier run")
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    grid = files_under(tmp_path / "ev" / "grid")
    assert "overlays/stale.png" not in grid and "overlays/scratch/000.png.png" in grid
    hidden = [n for n in os.listdir(tmp_path / "ev") if n.startswith(".")]
    assert sorted(hidden) == [".flow-mismatch", ".lock"]  # nothing left aside


# 5. score on an inspection line -----------------------------------------------------------------

def test_score_names_each_unreadable_file_and_scores_the_rest(trained, mvtec, tmp_path, capsys):
    imgs = tmp_path / "line"
    shutil.copytree(mvtec / "grid" / "test" / "good", imgs)
    (imgs / "001.png").write_bytes((imgs / "001.png").read_bytes()[:60])  # truncated
    (imgs / "002.png").write_bytes(b"")
    rc, err = cli(["score", "--ckpt", trained, imgs, "--out", tmp_path / "sc", "--category", "grid",
                   "-K", 1, "-T", 1], capsys)
    assert rc == fm.SKIPPED == 3
    assert any(line.startswith("flow_mismatch.py: images 4/4 ") for line in err), err  # the skipped count as done
    err = said(err)
    assert len(err) == 2 and "001.png" in err[0] and "002.png" in err[1] and "skipped" in err[0], err
    rows = list(csv.DictReader(open(tmp_path / "sc" / "scores.csv")))
    assert [r["score"] != "" for r in rows] == [True, False, False, True]
    assert files_under(tmp_path / "sc" / "heatmaps") == ["line", "line/000.png.png", "line/003.png.png"]


# 6. Ranges at parse time, no traceback, nothing written; one line on interrupt -------------------

def bad_invocations(d):
    """(argv, what the one line must say: the flag or path at fault, or a tuple of phrases); d holds data/
    and file.txt. Each fails before reading a checkpoint or data, or the line would name those."""
    data, ck, f = d / "data", d / "missing.pt", d / "file.txt"
    tr = ["train", "--data", data, "--out", d / "run", "--preset", "tiny"]
    te = ["test", "--ckpt", ck, "--data", data, "--out", d / "ev"]
    sc = ["score", "--ckpt", ck, data, "--out", d / "sc"]
    return [
        (tr + ["--image-size", 0], "--image-size"), (tr + ["--image-size", 100000], "--image-size"),
        (tr + ["--image-size", 18], "--image-size"), (tr + ["--seed", -1], "--seed"),
        (tr + ["--seed", 2**70], "--seed"), (tr + ["--steps", 0], "--steps"), (tr + ["--epochs", "x"], "--epochs"),
        (tr + ["--batch-size", 0], "--batch-size"), (tr + ["--save-epochs", "5,a"], "--save-epochs"),
        (tr + ["--device", "tpu"], "--device"),
        (tr + ["--lr", "nan"], "--lr"), (tr + ["--lr", "1e4"], "--lr"), (tr + ["--steps", 10**10], "--steps"),
        (tr + ["--epochs", 10**7], "--epochs"), (tr + ["--save-every", 10**10], "--save-every"),
        (tr + ["--save-every", 0], "--save-every"),
        (["train", "--data", data, "--out", f / "run"], ("--out", "file.txt is a file")),
        (["train", "--resume", d / "nothing"], "--resume"),
        (["train", "--data", data, "--preset", "huge", "--out", d / "run"], "--preset"),
        (te + ["-K", 0], "-K"), (te + ["-T", 1001], "-T"), (te + ["--max-batch", -1], "--max-batch"),
        (te + ["--seed", 2**40], "--seed"), (te + ["--t0", 1.5], "--t0"), (te + ["--ode-steps", 0], "--ode-steps"),
        (te + ["--aggregator", "median"], "--aggregator"), (te + ["--precision", "fp8"], "--precision"),
        (te + ["--score", "x"], "--score"),
        (te + ["--grid-K", "2,0"], "--grid-K"), (te + ["--eval-size", 10**5], "--eval-size"),
        (te + ["--device", "tpu"], "--device"),
        (["test", "--ckpt", ck, "--data", d / "none", "--out", f / "ev"], ("--out", "file.txt is a file")),
        (sc + ["--seed", -5], "--seed"), (sc + ["-T", 0], "-T"),
        (["score", "--ckpt", ck, d / "none", "--out", f], ("--out", "not a folder")),
        (["demo", "--out", d / "demo", "--image-size", 0], "--image-size"),
        (["demo", "--out", d / "demo", "--image-size", 18], "--image-size"),
        (["demo", "--out", d / "demo", "--steps", 0], "--steps"),
        (["demo", "--out", d / "demo", "--seed", -1], "--seed"),
        (["demo", "--out", d / "demo", "--device", "tpu"], "--device"),
        (["demo", "--out", f / "demo"], ("--out", "file.txt is a file")),
        (["bench", "--images", 0], "--images"), (["bench", "--repeats", 0], "--repeats"), (["bench", "-K", 0], "-K"),
        (["bench", "--image-size", 0], "--image-size"), (["bench", "--image-size", 18], "--image-size"),
        (["bench", "--max-batch", -1], "--max-batch"), (["bench", "--preset", "huge"], "--preset"),
        (["bench", "--device", "tpu"], "--device"), (["bench", "--json", data], "--json"),
        (["bench", "--json", f / "b.json"], ("--json", "file.txt exists and is not a folder")),
        (["explain", "--ckpt", ck, data / "x.png", "--out", d / "fig.png", "-K", 0], "-K"),
        (["explain", "--ckpt", ck, data / "x.png", "--out", d / "fig.png", "--seed", -1], "--seed"),
        (["explain", "--ckpt", ck, data / "x.png", "--out", f / "fig.png"], ("--out", "not a folder")),
        (["calibrate", "--ckpt", f / "ckpt.pt"], ("--ckpt", "not a folder")),
        (["calibrate", "--ckpt", ck, "-T", 0], "-T"),
        (sc + ["--alarm-rate", "x"], "--alarm-rate"),  # out of range: test_library (after the checkpoint)
        (["compare", d / "none.json", "--dataset", "mvtec"], "none.json"),
        (["compare", f / "metrics.json", "--dataset", "mvtec"], "file.txt"),
        (["compare", f, "--dataset", "nope"], "--dataset"),
    ]


def test_bad_invocations_exit_2_with_one_line_and_write_nothing(mvtec, tmp_path, monkeypatch, capsys):
    shutil.copytree(mvtec / "grid", tmp_path / "data" / "grid")
    (tmp_path / "file.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path)
    before = files_under(tmp_path)
    for argv, culprit in bad_invocations(tmp_path):
        rc, err = cli(argv, capsys)
        needles = culprit if isinstance(culprit, tuple) else (culprit,)
        assert rc == 2 and len(err) == 1 and all(n in err[0] for n in needles), (argv, rc, err)
        assert files_under(tmp_path) == before, argv
    assert (tmp_path / "file.txt").read_text() == "keep me"


@pytest.mark.parametrize("fault", [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"),
                                   OSError(28, "No space left on device", "out/x.json")])
def test_memory_and_disk_failures_are_one_line_with_status_1(monkeypatch, capsys, fault):
    def fails(*args, **kw):
        raise fault

    monkeypatch.setattr(fm, "bench", fails)
    rc, err = cli(["bench", "--preset", "tiny", "--device", "cpu"], capsys)
    assert rc == 1 and len(err) == 1 and ("out of memory" in err[0] or "No space left" in err[0]), err


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc to see the import begin")
def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    p = subprocess.Popen([sys.executable, str(ROOT / "flow_mismatch.py"), "demo", "--out", str(tmp_path / "demo")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = f"/proc/{p.pid}/maps"  # wait until numpy's C extension loads: past the handler, before torch
    while p.poll() is None and "_multiarray_umath" not in open(maps).read():
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and len([ln for ln in (out + err).splitlines() if "interrupted" in ln]) == 1, err


# 7. Messages tell the truth ---------------------------------------------------------------------

def test_divergence_names_a_checkpoint_only_when_there_is_one(mvtec, tmp_path):
    data = fm.load_train(mvtec, 16)
    for save_every, says in ((1000, "no checkpoint had been written"), (1, str(tmp_path / "b" / "ckpt.pt"))):
        out = tmp_path / ("a" if save_every == 1000 else "b")
        cfg = fm.TrainConfig(preset="tiny", image_size=16, batch_size=2, steps=50, lr=1e3, save_every=save_every)
        with pytest.raises(fm.UserError, match="diverged") as e:
            fm.train(data, cfg, out, "cpu", log=lambda *_: None)
        assert says in str(e.value) and (out / "ckpt.pt").exists() == (save_every == 1)


def test_checkpoints_take_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        fm.save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == 0o640


def test_category_given_to_an_unconditional_model_is_reported(single, mvtec, tmp_path, capsys):
    imgs = mvtec / "weave" / "test" / "good"
    rc, err = cli(["score", "--ckpt", single, imgs, "--out", tmp_path / "a", "--category", "grid", "-K", 1, "-T", 1],
                  capsys)
    assert rc == 2 and len(err) == 1 and "--category" in err[0] and "weave" in err[0], err
    rc, err = cli(["score", "--ckpt", single, imgs, "--out", tmp_path / "b", "--category", "weave", "-K", 1, "-T", 1],
                  capsys)
    assert any("images 4/4" in line for line in err), err
    assert all(line.startswith("flow_mismatch.py: ") for line in err), err  # progress too: one channel, one prefix
    err = said(err)
    assert rc == 0 and len(err) == 2 and "no effect" in err[0] and "unconditional" in err[0], err
    assert "--alarm-rate" in err[1]  # how to turn the scores into decisions


# 8. A GPU preset on a CPU says how long it would take ------------------------------------------

def test_gpu_preset_on_a_cpu_estimates_the_time_before_the_first_step(mvtec, tmp_path, monkeypatch):
    monkeypatch.setitem(fm.PRESETS, "paper", fm.PRESETS["tiny"])  # the paper preset's path, at tiny cost
    data = fm.load_train(mvtec, 16)
    logs = {"paper": [], "tiny": []}
    for preset, lines in logs.items():
        cfg = fm.TrainConfig(preset=preset, image_size=16, batch_size=2, steps=4)
        fm.train(data, cfg, tmp_path / preset, "cpu", log=lines.append)
    estimate = [ln for ln in logs["paper"] if "on a CPU: about" in ln]
    assert len(estimate) == 1 and "for 4 steps" in estimate[0], logs  # the CPU preset's command: test_newcomer.py
    assert logs["paper"].index(estimate[0]) < min(i for i, ln in enumerate(logs["paper"]) if ln.startswith("step "))
    assert not any("on a CPU" in ln for ln in logs["tiny"])
    assert any(ln.startswith("step 4/4") for ln in logs["tiny"]), logs  # the step lines go to log= too
