"""Nothing runs that a file smuggles in, and nothing written is lost: checkpoints read as plain data
and checked key by key; one writer per folder; atomic outputs; exact mask names; calibration bound to
the images and weights it checked; float images by their range; importable without fcntl."""

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flow_mismatch as fm
from conftest import ROOT, run_cli
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


# Every writer of a folder holds its lock -------------------------------------------------------

def test_calibrations_and_a_resumed_train_running_at_once_lose_nothing(mvtec, tmp_path):
    """Two `calibrate` runs on a slow rule, then `train --resume`, as three real processes: the run
    ends at the later step and holds both calibrations, each scored on the final weights."""
    run = tmp_path / "run"
    r = run_cli("train", "--data", mvtec, "--out", run, "--preset", "tiny", "--steps", 2, "--batch-size", 2,
                "--image-size", 16, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    fresh = {}
    for cat in ("weave", "grid"):  # two normal images each that the model has not seen
        fresh[cat] = tmp_path / f"fresh_{cat}"
        fresh[cat].mkdir()
        for name in ("000.png", "001.png"):
            shutil.copy(mvtec / cat / "test" / "good" / name, fresh[cat])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cals = [subprocess.Popen([sys.executable, str(ROOT / "flow_mismatch.py"), "calibrate", "--ckpt",
                              str(run / "ckpt.pt"), "--category", cat, "--data", str(fresh[cat]), "-K", "40",
                              "-T", "40", "--device", "cpu"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for cat in fresh]
    trainer = subprocess.Popen([sys.executable, str(ROOT / "flow_mismatch.py"), "train", "--resume", str(run),
                                "--steps", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    while not (run / ".lock").read_text().startswith(f"{trainer.pid} "):  # train holds the run folder
        assert trainer.poll() is None, trainer.communicate()
        time.sleep(0.05)
    assert all(p.poll() is None for p in cals)  # while both calibrations are still scoring
    results = [(p, *p.communicate(timeout=600)) for p in (trainer, *cals)]
    for p, out, err in results:
        assert p.returncode == 0, err
    assert all("scoring again" in err for _, _, err in results[1:])  # they had read the older weights
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 60
    assert sorted(ckpt["calibration"]) == ["grid", "weave"]
    for cat, cal in ckpt["calibration"].items():
        assert cal["step"] == 60 and cal["rule"]["K"] == 40
        assert cal["paths"] == [str(p.resolve()) for p in sorted(fresh[cat].iterdir())]


@pytest.mark.parametrize("command", ["test", "score"])
def test_a_second_run_into_a_busy_out_exits_2_naming_it(trained, mvtec, tmp_path, command, capsys):
    out = tmp_path / "ev"
    target = ["--data", mvtec] if command == "test" else [mvtec / "grid" / "test" / "good", "--category", "grid"]
    with fm.run_lock(out, command=command):  # what a first run holds while it works
        rc = fm.main([command, "--ckpt", str(trained), *map(str, target), "--out", str(out), "-K", "1", "-T", "1"])
        assert os.listdir(out) == [".lock"]  # nothing written beside the first run's
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    assert str(out) in err[0] and f"another {command} (pid {os.getpid()})" in err[0]


# Every output file is written atomically; a run replaces the previous one as a whole ------------

def test_an_interrupted_file_write_leaves_the_old_file_byte_identical(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{"old": 1}\n')
    with pytest.raises(fm.UserError, match="No space left"):
        with fm.atomic_write(path) as f:
            f.write('{"new": ')
            raise OSError(28, "No space left on device")
    assert path.read_text() == '{"old": 1}\n'
    assert os.listdir(tmp_path) == ["metrics.json"]  # no temp file left


def test_a_write_failing_mid_run_leaves_the_previous_run_byte_identical(trained, mvtec, tmp_path, monkeypatch,
                                                                         capsys):
    out = tmp_path / "ev"
    argv = ["test", "--ckpt", str(trained), "--data", str(mvtec), "--out", str(out), "-K", "1", "-T", "1"]
    assert fm.main(argv) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    writer = csv.writer

    class DiesAfterTwoRows:
        def __init__(self, f):
            self.w = writer(f)
            self.writerow = self.w.writerow

        def writerows(self, rows):
            self.w.writerows(list(rows)[:2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(fm.csv, "writer", DiesAfterTwoRows)
    assert fm.main(argv + ["-K", "2"]) == 1
    assert "No space left" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_interrupted_replacement_is_marked_incomplete_naming_what_is_missing(tmp_path, monkeypatch):
    out = tmp_path / "ev"
    (out / "grid").mkdir(parents=True)
    (out / "metrics.json").write_text("old")
    fm.record(out, ["grid", "metrics.json"])  # an earlier run's outputs
    replace = os.replace

    def interrupted_at_metrics(src, dst):
        if Path(src).parent.name == ".staging" and Path(src).name == "metrics.json":
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(fm.os, "replace", interrupted_at_metrics)
    with pytest.raises(KeyboardInterrupt):
        with fm.staged(out) as new:
            (new / "grid").mkdir()
            (new / "grid" / "scores.csv").write_text("new")
            (new / "metrics.json").write_text("new")
    assert sorted(n for n in os.listdir(out) if n[0] != ".") == ["INCOMPLETE", "grid"]  # not beside the old metrics
    assert (out / "grid" / "scores.csv").read_text() == "new"
    assert "missing: metrics.json" in (out / "INCOMPLETE").read_text()


def test_sigterm_during_test_is_one_line_and_keeps_the_previous_run(trained, mvtec, tmp_path):
    out = tmp_path / "ev"
    argv = [sys.executable, str(ROOT / "flow_mismatch.py"), "test", "--ckpt", str(trained), "--data", str(mvtec),
            "--out", str(out), "--no-overlays", "--device", "cpu"]
    assert subprocess.run(argv + ["-K", "1", "-T", "1"], capture_output=True).returncode == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    p = subprocess.Popen(argv + ["-K", "200", "-T", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (out / ".lock").read_text().startswith(f"{p.pid} "):  # it has begun: loading, then scoring
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    time.sleep(1)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "Traceback" not in err and [ln for ln in err.splitlines() if "flow_mismatch.py" in ln] == \
        ["flow_mismatch.py: interrupted"]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == before


# Exact mask names --------------------------------------------------------------------------------

def write_png(path, value, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="needs a file system where a.png and A.png differ")
def test_masks_match_their_image_by_exact_name_then_by_a_unique_name_up_to_case(tmp_path):
    cat = tmp_path / "cat"
    write_png(cat / "train" / "good" / "x.png", 100)
    for name, value in (("a", 1), ("A", 2), ("b", 3)):
        write_png(cat / "test" / "scratch" / f"{name}.png", 100)
        write_png(cat / "ground_truth" / "scratch" / f"{name.swapcase() if name == 'b' else name}_mask.png", value)
    (test,) = [c.test for c in fm.find_categories(cat)]
    got = {f.name: int(np.asarray(Image.open(ms[0])).max()) for f, _, ms in test}
    assert got == {"A.png": 2, "a.png": 1, "b.png": 3}  # b.png: B_mask.png, the one mask of its name up to case
    write_png(cat / "test" / "scratch" / "B.png", 100)  # now B_mask.png is B.png's exactly; b.png has none
    with pytest.raises(fm.UserError, match=r"b\.png.*B_mask\.png is the mask of .*B\.png"):
        fm.find_categories(cat)


# Calibration is bound to what it checked ---------------------------------------------------------

def test_calibrate_without_data_rescores_the_hold_out_from_anywhere_and_refuses_a_changed_file(mvtec, tmp_path,
                                                                                              monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(mvtec, data)
    monkeypatch.chdir(tmp_path)
    r = run_cli("train", "--data", "data", "--out", "run", "--preset", "tiny", "--steps", 2, "--batch-size", 2,
                "--image-size", 16, "--calib-fraction", 0.25, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    held = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["held_out"]["weave"]["paths"]
    assert len(held) == 2 and all(os.path.isabs(p) and Path(p).is_file() for p in held)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths would now point at nothing
    calibrate = ("calibrate", "--ckpt", tmp_path / "run" / "ckpt.pt", "--category", "weave", "-K", 1, "-T", 1)
    r = run_cli(*calibrate)
    assert r.returncode == 0, r.stderr
    assert "on 2 normal images" in r.stdout
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    Image.open(held[0]).rotate(90).save(held[0])  # another image under the recorded name
    assert_user_error(run_cli(*calibrate), held[0], "changed")
    os.remove(held[0])
    assert_user_error(run_cli(*calibrate), held[0], "missing")
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before


def test_a_calibration_of_older_weights_is_refused(trained, mvtec, tmp_path, capsys):
    ckpt = torch.load(trained, weights_only=True)
    assert {cal["step"] for cal in ckpt["calibration"].values()} == {ckpt["step"]}
    ckpt["step"] += 1  # as if trained on while its calibration stayed
    fm.save_checkpoint(tmp_path / "moved.pt", ckpt)
    images = mvtec / "grid" / "test" / "good"
    rc = fm.main(["score", "--ckpt", str(tmp_path / "moved.pt"), str(images), "--out", str(tmp_path / "o"),
                  "--category", "grid", "--alarm-rate", "0.6"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and "step 6, not on these (step 7)" in err[0], err
    assert not (tmp_path / "o").exists()


def test_resume_refuses_other_data_or_a_changed_flag_and_keeps_every_training_image_on_record(mvtec, tmp_path,
                                                                                              capsys):
    data, other = tmp_path / "data", tmp_path / "other"
    shutil.copytree(mvtec, data)
    shutil.copytree(mvtec, other)
    run = tmp_path / "run"
    r = run_cli("train", "--data", data, "--out", run, "--preset", "tiny", "--steps", 2, "--batch-size", 2,
                "--image-size", 16, "--calib-fraction", 0, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    first = torch.load(run / "ckpt.pt", weights_only=True)["trained_on"]
    before = (run / "ckpt.pt").read_bytes()
    changed = [["--lr", 0.01], ["--batch-size", 3], ["--batch-size", 32], ["--image-size", 32], ["--preset", "small"],
               ["--seed", 1], ["--pooled"], ["--calib-fraction", 0.5]]  # --batch-size 32: a default, given
    for argv, needles in [(["--data", other], ("--data", "other")), *[(a, (a[0], "differs")) for a in changed]]:
        rc = fm.main(["train", "--resume", str(run), *map(str, argv), "--steps", "3"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert rc == 2 and len(err) == 1 and all(n in err[0] for n in needles), (argv, err)
    assert (run / "ckpt.pt").read_bytes() == before
    (data / "weave" / "train" / "good" / "000.png").unlink()  # the run's data lost an image it trained on
    r = run_cli("train", "--resume", run, "--steps", 3, "--batch-size", 2)  # an unchanged flag is fine
    assert r.returncode == 0, r.stderr
    assert "--steps 2 -> 3" in r.stderr
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == 3 and set(first) <= set(ckpt["trained_on"]) and len(ckpt["trained_on"]) == len(first)
    assert fm.main(["train", "--resume", str(run), "--epochs", "2"]) == 0  # 15 images, batch 2: 7 steps an epoch
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 14


# Images as meant; means that say what they are over; bounded flags --------------------------------

def test_float_images_are_read_by_their_range(tmp_path, capsys):
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp, mode="F").save(tmp_path / "unit.tif")
    Image.fromarray(ramp * 4000 - 1000, mode="F").save(tmp_path / "wide.tif")
    unit, _ = fm.read_image(tmp_path / "unit.tif", None)
    assert np.array_equal(unit[..., 0], (ramp * 255).round().astype(np.uint8))
    assert capsys.readouterr().err == ""
    wide, _ = fm.read_image(tmp_path / "wide.tif", None)
    assert np.array_equal(wide, unit)  # min-max: the same ramp
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "wide.tif" in err[0] and "min-max" in err[0], err


def test_the_mean_says_over_how_many_categories_each_metric_is(mvtec):
    tests = fm.load_test(mvtec, 16)
    tests["grid"].mask_files = None  # no ground truth: image metrics only
    results = fm.metrics_of(tests, {name: (np.asarray(d.images.float().mean(1)) / 255,
                                           np.asarray(d.images.float().mean((1, 2, 3)))) for name, d in tests.items()})
    counts = results[fm.MEAN]["categories"]
    assert counts == {k: 2 if k.startswith("image") else 1 for k in fm.METRICS}
    assert results[fm.MEAN]["pixel_auroc"] == results["weave"]["pixel_auroc"]


def test_the_module_imports_and_locks_where_fcntl_does_not_exist(tmp_path):
    """As on Windows: no fcntl; the lock goes through msvcrt.locking (a stand-in recording its calls)."""
    script = f"""
import sys, types
import numpy, torch  # their own POSIX internals may use fcntl: loaded first, as they load on Windows without it
sys.modules["fcntl"] = None  # from here, import fcntl raises ImportError
calls, busy = [], [False]
def locking(fd, mode, n):
    calls.append((mode, n))
    if busy[0]:
        raise OSError(13, "Permission denied")
sys.modules["msvcrt"] = types.SimpleNamespace(LK_NBLCK=2, locking=locking)
sys.path.insert(0, {str(ROOT)!r})
import flow_mismatch as fm
from pathlib import Path
out = Path({str(tmp_path / 'run')!r})
with fm.run_lock(out, command="train"):
    assert (out / ".lock").read_text().split()[1] == "train"
    busy[0] = True
    try:
        with fm.run_lock(out):
            raise SystemExit("a held lock was taken twice")
    except fm.UserError as e:
        assert "in use by another train" in str(e), e
assert calls == [(2, 1), (2, 1)], calls
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
