"""Durability and concurrency: every writer holds its lock (one run per folder, one writer at a time,
importable and locking without fcntl); an output folder holds only what this program wrote (its
.flow-mismatch record), is checked before any work and replaced as a whole; no write follows a link or
replaces a special file; every file is written atomically, staged and moved in whole; a full or
refused disk is one line and keeps the previous run; an interrupted run (signal, Ctrl-C, divergence)
says so in one line, keeps its last checkpoint and resumes exactly; a file gone mid-run is named and
skipped; torchrun processes agree. Each situation is built for real and the victim's bytes are
checked afterwards."""

import csv
import os
import shutil
import signal
import socket
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
from test_bad_input import cli as cli_all, files_under

K1 = ["-K", "1", "-T", "1", "--device", "cpu"]


def cli(argv, capsys):
    """In-process `flow_mismatch.py ARGV` -> (exit status, its error lines); a traceback fails the test."""
    rc = fm.main([str(a) for a in argv])
    err = capsys.readouterr().err.splitlines()
    return rc, [line for line in err if line.startswith("flow_mismatch.py: error:")]


def snapshot(folder):
    """Every file under folder (links not followed) -> its bytes; every folder -> None."""
    return {str(p.relative_to(folder)): None if p.is_dir() and not p.is_symlink() else
            (os.readlink(p) if p.is_symlink() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def data(mvtec, tmp_path):
    """A private copy of the generated mvtec data (tests change or watch it)."""
    return shutil.copytree(mvtec, tmp_path / "mvtec")


@pytest.fixture
def victim(tmp_path):
    """A file of the user's that no command may change."""
    path = tmp_path / "victim.txt"
    path.write_text("the user's own bytes\n")
    return path


def refused(rc, err, *names):
    assert rc == 2 and len(err) == 1, err
    for name in names:
        assert str(name) in err[0], err


# 1. An output folder holds only what this program wrote ------------------------------------------

def test_test_with_out_equal_to_or_inside_data_is_refused_and_the_data_kept(trained, data, capsys):
    before = snapshot(data)
    for out in (data, data / "weave", data / "weave" / "test"):
        rc, err = cli(["test", "--ckpt", trained, "--data", data, "--out", out, *K1], capsys)
        refused(rc, err, "--out", out, "--data")
    assert snapshot(data) == before


def test_an_out_that_links_into_the_data_is_refused(trained, data, tmp_path, capsys):
    (tmp_path / "ev").symlink_to(data / "grid")
    before = snapshot(data)
    rc, err = cli(["test", "--ckpt", trained, "--data", data, "--out", tmp_path / "ev", *K1], capsys)
    refused(rc, err, "--out", "--data")
    assert snapshot(data) == before


def test_score_into_its_own_image_folder_is_refused_and_keeps_the_users_folders(trained, tmp_path, mvtec, capsys):
    line = shutil.copytree(mvtec / "grid" / "test" / "good", tmp_path / "line")
    for mine in ("masks", "maps"):
        (line / mine).mkdir()
        (line / mine / "notes.txt").write_text(f"my {mine}")
    before = snapshot(line)
    rc, err = cli(["score", "--ckpt", trained, line, "--out", line, "--category", "grid", *K1], capsys)
    refused(rc, err, "--out", "images")
    assert snapshot(line) == before


def test_a_users_entry_named_like_an_output_is_refused_before_anything_is_written(trained, tmp_path, mvtec, capsys):
    out = tmp_path / "out"
    (out / "maps").mkdir(parents=True)
    (out / "maps" / "mine.tiff").write_bytes(b"the user's map")
    before = snapshot(out)
    images = mvtec / "grid" / "test" / "good"
    rc, err = cli(["score", "--ckpt", trained, images, "--out", out, "--category", "grid", *K1], capsys)
    refused(rc, err, out / "maps", "not written by flow_mismatch.py")
    assert snapshot(out) == {**before, ".lock": snapshot(out)[".lock"]}  # only the lock was made


def test_a_users_masks_folder_is_never_removed_as_stale(trained, tmp_path, mvtec, capsys):
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "mine.png").write_bytes(b"the user's mask")
    images = mvtec / "grid" / "test" / "good"
    rc, err = cli(["score", "--ckpt", trained, images, "--out", out, "--category", "grid", *K1], capsys)
    assert rc == 0, err
    assert (out / "masks" / "mine.png").read_bytes() == b"the user's mask"
    assert "masks" not in fm.written_here(out) and "scores.csv" in fm.written_here(out)


def test_a_rerun_replaces_its_own_outputs_and_removes_its_own_stale_masks(trained, tmp_path, mvtec, capsys):
    out = tmp_path / "out"
    images = mvtec / "grid" / "test" / "good"
    ckpt = shutil.copy(trained, tmp_path / "ckpt.pt")  # calibrated here, the fixture's stays as it is
    assert cli(["calibrate", "--ckpt", ckpt, "--data", mvtec / "grid" / "test" / "good", "--category", "grid",
                *K1], capsys)[0] == 0
    argv = ["score", "--ckpt", ckpt, images, "--out", out, "--category", "grid", *K1]
    assert cli(argv + ["--alarm-rate", "0.5"], capsys)[0] == 0
    assert (out / "masks").is_dir() and "masks" in fm.written_here(out)
    assert cli(argv, capsys)[0] == 0
    assert not (out / "masks").exists() and "masks" not in fm.written_here(out)


def test_out_dot_with_the_data_below_it_is_protected_by_the_record_alone(trained, tmp_path, mvtec, capsys):
    """--out is the folder that holds the category folder --data: the output `weave/` would replace
    it; the input is not ours, so the run is refused and the data kept."""
    weave = shutil.copytree(mvtec / "weave", tmp_path / "weave")
    before = snapshot(weave)
    rc, err = cli(["test", "--ckpt", trained, "--data", weave, "--out", tmp_path, *K1], capsys)
    refused(rc, err, weave, "not written by flow_mismatch.py")
    assert snapshot(weave) == before
    assert not (tmp_path / "metrics.json").exists()


def test_test_out_and_save_maps_the_same_or_nested_are_refused_naming_both(trained, data, tmp_path, capsys):
    for out, maps in ((tmp_path / "D", tmp_path / "D"), (tmp_path / "D", tmp_path / "D" / "maps"),
                      (tmp_path / "D" / "ev", tmp_path / "D")):
        rc, err = cli(["test", "--ckpt", trained, "--data", data, "--out", out, "--save-maps", maps, *K1], capsys)
        refused(rc, err, "--out", "--save-maps")
        assert "pid" not in err[0]
    assert not (tmp_path / "D").exists()


def test_a_map_name_clash_is_refused_before_out_is_written(trained, data, tmp_path, capsys):
    Image.open(data / "grid" / "test" / "good" / "001.png").save(data / "grid" / "test" / "good" / "000.jpg")
    out = tmp_path / "ev"
    rc, err = cli(["test", "--ckpt", trained, "--data", data, "--out", out, "--save-maps", tmp_path / "maps", *K1],
                  capsys)
    refused(rc, err, "two images would share this map")
    assert not out.exists() and not (tmp_path / "maps").exists()


def test_the_users_own_staging_folder_is_never_removed(trained, tmp_path, mvtec, capsys):
    out = tmp_path / "out"
    (out / ".staging").mkdir(parents=True)
    (out / ".staging" / "mine").write_text("the user's")
    images = mvtec / "grid" / "test" / "good"
    rc, err = cli(["score", "--ckpt", trained, images, "--out", out, "--category", "grid", *K1], capsys)
    refused(rc, err, out / ".staging")
    assert (out / ".staging" / "mine").read_text() == "the user's"


def test_train_into_a_folder_holding_the_users_loss_png_is_refused_before_training(mvtec, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "loss.png").write_bytes(b"the user's plot")
    rc, err = cli(["train", "--data", mvtec, "--out", run, "--preset", "tiny", "--steps", "1", "--batch-size", "2",
                   "--image-size", "16", "--device", "cpu"], capsys)
    refused(rc, err, run / "loss.png")
    assert (run / "loss.png").read_bytes() == b"the user's plot" and not (run / "ckpt.pt").exists()


def test_train_with_its_run_folder_inside_the_data_is_refused(data, capsys):
    before = snapshot(data)
    rc, err = cli(["train", "--data", data, "--out", data / "run", "--preset", "tiny", "--steps", "1"], capsys)
    refused(rc, err, "--out", "--data")
    assert snapshot(data) == before


def test_explain_never_writes_over_its_image_nor_the_users_json(trained, tmp_path, mvtec, capsys):
    image = shutil.copy(mvtec / "grid" / "test" / "good" / "000.png", tmp_path / "img.png")
    original = image.read_bytes() if hasattr(image, "read_bytes") else open(image, "rb").read()
    rc, err = cli(["explain", "--ckpt", trained, image, "--out", image, "--category", "grid", *K1], capsys)
    refused(rc, err, "--out", "image")
    (tmp_path / "fig.json").write_text("the user's json")
    rc, err = cli(["explain", "--ckpt", trained, image, "--out", tmp_path / "fig.png", "--category", "grid", *K1],
                  capsys)
    refused(rc, err, tmp_path / "fig.json")
    assert (tmp_path / "fig.json").read_text() == "the user's json" and not (tmp_path / "fig.png").exists()
    assert open(image, "rb").read() == original


# 2. No write follows a link or replaces a special file -------------------------------------------

def test_a_lock_that_is_a_symlink_is_refused_and_its_target_kept(trained, tmp_path, mvtec, victim, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / ".lock").symlink_to(victim)
    images = mvtec / "grid" / "test" / "good"
    rc, err = cli(["score", "--ckpt", trained, images, "--out", out, "--category", "grid", *K1], capsys)
    refused(rc, err, out / ".lock", "symbolic link")
    assert victim.read_text() == "the user's own bytes\n"


def test_calibrate_through_a_received_run_folder_with_a_linked_lock_keeps_the_target(trained, tmp_path, mvtec,
                                                                                   victim, capsys):
    it = tmp_path / "it"
    it.mkdir()
    ckpt = shutil.copy(trained, it / "ckpt.pt")
    (it / ".lock").symlink_to(victim)
    before = open(ckpt, "rb").read()
    rc, err = cli(["calibrate", "--ckpt", ckpt, "--data", mvtec / "grid" / "test" / "good", "--category", "grid",
                   *K1], capsys)
    refused(rc, err, it / ".lock")
    assert victim.read_text() == "the user's own bytes\n" and open(ckpt, "rb").read() == before


@pytest.mark.parametrize("kind", ["hard link", "fifo", "folder", "foreign file"])
def test_a_lock_that_is_not_a_plain_lock_file_of_ours_is_refused_untouched(tmp_path, victim, kind):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / ".lock"
    if kind == "hard link":
        os.link(victim, lock)
    elif kind == "fifo":
        os.mkfifo(lock)  # opening it for the lock must not hang
    elif kind == "folder":
        lock.mkdir()
    else:
        lock.write_text("my notes, not a lock\n")
    with pytest.raises(fm.UserError, match=r"\.lock"):
        with fm.run_lock(out, command="score"):
            pass
    assert victim.read_text() == "the user's own bytes\n"
    if kind == "foreign file":
        assert lock.read_text() == "my notes, not a lock\n"


@pytest.mark.parametrize("kind", ["symlink", "fifo", "socket"])
def test_an_output_that_is_a_link_or_special_file_is_refused_by_name(trained, tmp_path, mvtec, victim, kind,
                                                                      monkeypatch, capsys):
    out = tmp_path / "out"
    images = mvtec / "grid" / "test" / "good"
    argv = ["score", "--ckpt", trained, images, "--out", out, "--category", "grid", *K1]
    assert cli(argv, capsys)[0] == 0  # scores.csv is now an entry of ours
    (out / "scores.csv").unlink()
    if kind == "symlink":
        (out / "scores.csv").symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(out / "scores.csv")
    else:
        s = socket.socket(socket.AF_UNIX)
        monkeypatch.chdir(out)  # a socket's path must be short
        s.bind("scores.csv")
    rc, err = cli(argv, capsys)
    refused(rc, err, out / "scores.csv", {"symlink": "symbolic link", "fifo": "FIFO", "socket": "socket"}[kind])
    assert victim.read_text() == "the user's own bytes\n"


def test_atomic_write_replaces_only_a_regular_file(tmp_path, victim):
    link = tmp_path / "out.json"
    link.symlink_to(victim)
    with pytest.raises(fm.UserError, match="symbolic link"):
        fm.write_text(link, "new")
    assert victim.read_text() == "the user's own bytes\n" and link.is_symlink()


def test_a_checkpoint_that_is_a_symlink_is_not_written_through_by_calibrate(trained, tmp_path, mvtec, capsys):
    shared = shutil.copy(trained, tmp_path / "shared.pt")
    before = open(shared, "rb").read()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt.pt").symlink_to(shared)
    rc, err = cli(["calibrate", "--ckpt", tmp_path / "run" / "ckpt.pt", "--data", mvtec / "grid" / "test" / "good",
                   "--category", "grid", *K1], capsys)
    refused(rc, err, "--ckpt", "symbolic link")
    assert open(shared, "rb").read() == before


# 3-4. Check, then write; demo's data and run written aside and moved in --------------------------

@pytest.fixture
def quick_demo(monkeypatch):
    """`demo` at 16 pixels on 8 + 4 images per category, scored at K = T = 1 (what it writes, not how well)."""
    make, evaluate = fm.make_demo_dataset, fm.evaluate
    monkeypatch.setattr(fm, "make_demo_dataset", lambda root, size: make(root, size, n_train=8, n_test=4))
    monkeypatch.setattr(fm, "evaluate", lambda ckpt, data, out, cfg, device: evaluate(
        ckpt, data, out, fm.ScoreConfig(K=1, T=1), device, overlays=False, log=lambda *a: None))
    return ["demo", "--steps", "2", "--image-size", "16", "--device", "cpu"]


def test_a_second_demo_stopping_on_a_bad_data_file_keeps_the_previous_checkpoint(quick_demo, tmp_path, capsys):
    out = tmp_path / "d"
    assert cli(quick_demo + ["--out", out], capsys)[0] == 0
    before = snapshot(out / "run")
    bad = out / "data" / "weave" / "train" / "good" / "003.png"
    bad.write_bytes(b"not a png")
    rc, err = cli(quick_demo + ["--out", out], capsys)
    refused(rc, err, bad)
    assert snapshot(out / "run") == before
    assert not (out / ".staging").exists()


def test_an_interrupted_demo_is_recovered_by_the_next(quick_demo, tmp_path, monkeypatch, capsys):
    out = tmp_path / "d"
    save, calls = fm.save_image, []

    def interrupted(path, im):
        calls.append(path)
        if len(calls) == 20:  # Ctrl-C while it writes its data
            raise KeyboardInterrupt
        save(path, im)

    monkeypatch.setattr(fm, "save_image", interrupted)
    assert cli(quick_demo + ["--out", out], capsys)[0] == 130
    assert not (out / "data").exists()  # a part is never left where the data belongs
    monkeypatch.setattr(fm, "save_image", save)
    rc, err = cli(quick_demo + ["--out", out], capsys)
    assert rc == 0, err
    assert len(list((out / "data" / "weave" / "ground_truth" / "scratch").iterdir())) == 2


def test_demo_into_a_folder_with_the_users_run_folder_removes_nothing(quick_demo, tmp_path, capsys):
    out = tmp_path / "d"
    (out / "run").mkdir(parents=True)
    (out / "run" / "ckpt.pt").write_bytes(b"the user's checkpoint")
    before = snapshot(out)
    rc, err = cli(quick_demo + ["--out", out], capsys)
    refused(rc, err, out / "run")
    assert {k: v for k, v in snapshot(out).items() if k != ".lock"} == before


# 5. Failures of the disk are one line ---------------------------------------------------------

def full_disk_torch_save(*args, **kwargs):
    """What torch.save raises when the disk fills under its zip writer."""
    raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_old_one(mvtec, tmp_path, monkeypatch,
                                                                               capsys):
    tiny = ["--preset", "tiny", "--steps", "1", "--batch-size", "2", "--image-size", "16", "--device", "cpu"]
    first, run = tmp_path / "first", tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(fm.torch, "save", full_disk_torch_save)
        rc, err = cli(["train", "--data", mvtec, "--out", first, *tiny], capsys)
    assert rc == 1 and len(err) == 1, err
    assert str(first / "ckpt.pt") in err[0] and "nothing was written there" in err[0]
    assert cli(["train", "--data", mvtec, "--out", run, *tiny], capsys)[0] == 0
    before = (run / "ckpt.pt").read_bytes()
    monkeypatch.setattr(fm.torch, "save", full_disk_torch_save)
    for argv in (["train", "--resume", run, "--steps", "2", "--device", "cpu"],
                 ["calibrate", "--ckpt", run / "ckpt.pt", "--data", mvtec / "grid" / "test" / "good",
                  "--category", "grid", *K1]):
        rc, err = cli(argv, capsys)
        assert rc == 1 and len(err) == 1, err
        assert str(run / "ckpt.pt") in err[0] and "previous ckpt.pt is kept" in err[0], err
        assert (run / "ckpt.pt").read_bytes() == before
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 8 MiB that fills up (tmpfs), where this machine lets the test mount one."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here; the injected faults above stand in for it")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_really_full_disk_under_a_checkpoint_is_one_line_and_keeps_the_old_one(trained, small_disk, mvtec, capsys):
    run = small_disk / "run"
    run.mkdir()
    shutil.copy(trained, run / "ckpt.pt")  # most of the 8 MiB: no room for a second copy beside it
    before = (run / "ckpt.pt").read_bytes()
    rc, err = cli(["calibrate", "--ckpt", run / "ckpt.pt", "--data", mvtec / "grid" / "test" / "good",
                   "--category", "grid", *K1], capsys)
    assert rc == 1 and len(err) == 1, err
    assert str(run / "ckpt.pt") in err[0] and "previous ckpt.pt is kept" in err[0], err
    assert (run / "ckpt.pt").read_bytes() == before
    assert sorted(os.listdir(run)) == [".lock", "ckpt.pt"]  # no temp file left


@pytest.mark.parametrize("errno_, words", [(28, "No space left"), (30, "Read-only"), (13, "Permission denied"),
                                            (36, "name too long")])
def test_a_refused_write_of_any_output_is_one_line_and_keeps_the_previous_run(trained, tmp_path, mvtec, monkeypatch,
                                                                             capsys, errno_, words):
    out = tmp_path / "out"
    images = mvtec / "grid" / "test" / "good"
    argv = ["score", "--ckpt", trained, images, "--out", out, "--category", "grid", *K1]
    assert cli(argv, capsys)[0] == 0
    before = snapshot(out)
    fdopen = os.fdopen

    class Refusing:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, b):
            raise OSError(errno_, os.strerror(errno_))

        def __getattr__(self, name):
            return getattr(self.f, name)

    def refusing_writes(fd, mode="r", *args, **kwargs):  # every file opened to be written (the lock aside)
        f = fdopen(fd, mode, *args, **kwargs)
        return Refusing(f) if mode.startswith("w") else f

    monkeypatch.setattr(fm.os, "fdopen", refusing_writes)
    rc, err = cli(argv, capsys)
    assert rc == 1 and len(err) == 1 and words.lower() in err[0].lower() and str(out) in err[0], err
    monkeypatch.undo()
    assert {k: v for k, v in snapshot(out).items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


def test_a_hard_linked_target_is_replaced_not_written_through(tmp_path, victim):
    link = tmp_path / "metrics.json"
    os.link(victim, link)
    fm.write_text(link, "new")
    assert victim.read_text() == "the user's own bytes\n" and link.read_text() == "new"


def test_a_long_output_name_gets_a_short_temp_name(tmp_path):
    path = tmp_path / ("x" * 250 + ".json")
    fm.write_text(path, "{}")
    assert path.read_text() == "{}"


# 6. A file gone mid-run is named and skipped ----------------------------------------------------

def test_a_file_removed_between_listing_and_reading_is_named_and_skipped_exit_3(trained, tmp_path, mvtec,
                                                                             monkeypatch, capsys):
    """40 images, scored 32 at a time; one of the second chunk moved away while the first is written."""
    line = tmp_path / "line"
    line.mkdir()
    src = sorted((mvtec / "grid" / "test").rglob("*.png"))
    for i in range(40):
        shutil.copy(src[i % len(src)], line / f"{i:03d}.png")
    gone = line / "038.png"
    write_overlays = fm.write_overlays

    def moved_away_while_the_first_chunk_is_written(*args, **kwargs):
        gone.unlink(missing_ok=True)
        return write_overlays(*args, **kwargs)

    monkeypatch.setattr(fm, "write_overlays", moved_away_while_the_first_chunk_is_written)
    out = tmp_path / "out"
    rc = fm.main(["score", "--ckpt", str(trained), str(line), "--out", str(out), "--category", "grid", *K1])
    err = capsys.readouterr().err
    assert rc == fm.SKIPPED == 3
    assert f"warning: {gone}" in err and "error" not in err
    rows = list(csv.reader(open(out / "scores.csv")))[1:]
    assert [r[0] for r in rows if r[1] == ""] == [str(gone)] and sum(r[1] != "" for r in rows) == 39
    assert len(list((out / "maps" / "line").iterdir())) == 39


def test_a_long_input_name_scores_and_its_temp_names_stay_within_the_limit(trained, tmp_path, mvtec, capsys):
    line = tmp_path / "line"
    line.mkdir()
    long = line / ("y" * 240 + ".png")
    shutil.copy(mvtec / "grid" / "test" / "good" / "000.png", long)
    rc, err = cli(["score", "--ckpt", trained, line, "--out", tmp_path / "out", "--category", "grid", *K1], capsys)
    assert rc == 0, err
    assert (tmp_path / "out" / "maps" / "line" / (long.name + ".tiff")).is_file()


def test_input_names_too_long_for_an_overlay_name_score_each_under_a_name_of_its_own(trained, tmp_path, mvtec, capsys):
    """A name of 255 bytes, the most a file system allows, would overflow with .png or .tiff added: it is
    kept to its first 200 bytes and a digest of the whole, so two that differ only at the end stay apart."""
    line = tmp_path / "line"
    line.mkdir()
    for end in "ab":
        shutil.copy(mvtec / "grid" / "test" / "good" / "000.png", line / ("y" * 250 + end + ".png"))
    rc, err = cli(["score", "--ckpt", trained, line, "--out", tmp_path / "out", "--category", "grid", *K1], capsys)
    assert rc == 0, err
    maps = sorted(p.name for p in (tmp_path / "out" / "maps" / "line").iterdir())
    assert len(maps) == 2 and all(m.startswith("y" * 200 + "~") and m.endswith(".tiff") for m in maps), maps


# Further cases of the same principles -------------------------------------------------------------

def test_an_output_hard_linked_to_the_users_file_is_replaced_without_touching_it(trained, tmp_path, mvtec, victim,
                                                                                  capsys):
    out = tmp_path / "out"
    argv = ["score", "--ckpt", trained, mvtec / "grid" / "test" / "good", "--out", out, "--category", "grid", *K1]
    assert cli(argv, capsys)[0] == 0
    (out / "scores.csv").unlink()
    os.link(victim, out / "scores.csv")
    assert cli(argv, capsys)[0] == 0
    assert victim.read_text() == "the user's own bytes\n" and (out / "scores.csv").read_text().startswith("path,")


def test_a_record_that_is_a_link_is_refused_and_its_target_kept(tmp_path, victim):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".flow-mismatch").symlink_to(victim)
    with pytest.raises(fm.UserError, match="symbolic link"):
        with fm.staged(out) as new:
            (new / "metrics.json").write_text("{}")
    assert victim.read_text() == "the user's own bytes\n" and not (out / "metrics.json").exists()


def test_a_dangling_link_as_out_is_refused_as_not_a_folder(trained, tmp_path, mvtec, capsys):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    rc, err = cli(["score", "--ckpt", trained, mvtec / "grid" / "test" / "good", "--out", tmp_path / "out",
                   "--category", "grid", *K1], capsys)
    refused(rc, err, "--out", "not a folder")
    assert not (tmp_path / "nowhere").exists()


def test_commands_that_only_read_a_checkpoint_write_nothing_beside_it(trained, tmp_path, mvtec, capsys):
    run = shutil.copytree(trained.parent, tmp_path / "run")
    before = snapshot(run)
    image = mvtec / "grid" / "test" / "good" / "000.png"
    for argv in (["score", "--ckpt", run / "ckpt.pt", image, "--out", tmp_path / "s", "--category", "grid", *K1],
                 ["test", "--ckpt", run / "ckpt.pt", "--data", mvtec, "--out", tmp_path / "t", "--no-overlays", *K1],
                 ["explain", "--ckpt", run / "ckpt.pt", image, "--out", tmp_path / "e" / "f.png", "--category", "grid",
                  *K1]):
        assert cli(argv, capsys)[0] == 0
    assert snapshot(run) == before


def test_compare_never_writes_over_the_users_file_beside_a_metrics_json(tmp_path, capsys):
    m = dict.fromkeys(fm.METRICS, 0.9)
    (tmp_path / "metrics.json").write_text(fm.json.dumps({"bottle": m, "mean": m}))
    (tmp_path / "compare_mvtec.md").write_text("the user's notes")
    rc, err = cli(["compare", tmp_path / "metrics.json", "--dataset", "mvtec"], capsys)
    refused(rc, err, tmp_path / "compare_mvtec.md")
    assert (tmp_path / "compare_mvtec.md").read_text() == "the user's notes"
    (tmp_path / "compare_mvtec.md").unlink()
    assert cli(["compare", tmp_path / "metrics.json", "--dataset", "mvtec"], capsys)[0] == 0
    assert cli(["compare", tmp_path / "metrics.json", "--dataset", "mvtec"], capsys)[0] == 0  # its own: replaced


def test_bench_json_over_the_users_file_is_refused_before_the_bench(tmp_path, monkeypatch, capsys):
    (tmp_path / "b.json").write_text("the user's")
    monkeypatch.setattr(fm, "bench", lambda *a, **k: pytest.fail("benched before the check"))
    rc, err = cli(["bench", "--preset", "tiny", "--device", "cpu", "--json", tmp_path / "b.json"], capsys)
    refused(rc, err, "--json", tmp_path / "b.json")
    assert (tmp_path / "b.json").read_text() == "the user's"


def test_a_run_killed_while_staging_leaves_nothing_a_rerun_trips_on(trained, tmp_path, mvtec, monkeypatch, capsys):
    """Killed (kill -9: no cleanup) while its outputs were being written aside: the next run finds a
    .staging of its own and carries on."""
    out = tmp_path / "out"
    argv = ["score", "--ckpt", trained, mvtec / "grid" / "test" / "good", "--out", out, "--category", "grid", *K1]

    def killed(*args, **kwargs):
        (out / ".staging" / "heatmaps").mkdir()
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(fm, "write_overlays", killed)
        m.setattr(fm.shutil, "rmtree", lambda *a, **k: None)  # as if killed before any cleanup
        assert cli(argv, capsys)[0] == 130
    assert (out / ".staging" / "heatmaps").is_dir()
    rc, err = cli(argv, capsys)
    assert rc == 0, err
    assert sorted(n for n in os.listdir(out) if n[0] != ".") == ["heatmaps", "maps", "scores.csv"]
    assert not (out / ".staging").exists()
def test_a_really_full_disk_under_score_is_one_line_and_keeps_the_previous_run(trained, small_disk, mvtec, capsys):
    out = small_disk / "out"
    argv = ["score", "--ckpt", trained, mvtec / "grid" / "test" / "good", "--out", out, "--category", "grid", *K1]
    assert cli(argv, capsys)[0] == 0
    before = snapshot(out)
    with open(small_disk / "filler", "wb", buffering=0) as f:  # the rest of the disk taken by another program
        with pytest.raises(OSError, match="No space left"):
            while True:
                f.write(b"\0" * 4096)
    rc, err = cli(argv, capsys)
    assert rc == 1 and len(err) == 1 and "No space left" in err[0] and str(out) in err[0], err
    assert snapshot(out) == before


# Locks: one writer per folder ---------------------------------------------------------------------

TINY = ["--preset", "tiny", "--batch-size", "2", "--image-size", "16", "--device", "cpu"]


def test_a_second_train_on_a_busy_folder_exits_2_naming_it_and_the_holder(mvtec, tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-u", str(ROOT / "flow_mismatch.py"), "train", "--data", str(mvtec),
                              "--out", str(run), "--steps", "100000", "--save-every", "1", *TINY],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert "parameters" in first.stderr.readline()  # training has begun
        for argv in (["train", "--data", mvtec, "--out", run, "--steps", 1, *TINY], ["train", "--resume", run]):
            rc, err = cli_all(argv, capsys)
            assert rc == 2 and len(err) == 1, err
            assert str(run) in err[0] and f"pid {first.pid}" in err[0], err[0]
        while not (run / "ckpt.pt").exists():
            time.sleep(0.1)
    finally:
        first.kill()  # SIGKILL: the OS drops the lock with the process
        first.wait()
    step = torch.load(run / "ckpt.pt", weights_only=True)["step"]
    rc, err = cli_all(["train", "--resume", run, "--steps", step + 1], capsys)
    assert rc == 0, err
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == step + 1


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


# Output folders: checked before any work, nothing written outside, replaced as a whole ------------

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
            rc, err = cli_all(argv, capsys)
            assert rc == 2 and len(err) == 1 and "--out" in err[0] and "cannot be written" in err[0], err
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_data_dot_names_the_folder_and_nothing_is_written_outside_out(mvtec, tmp_path, monkeypatch, capsys):
    cat = tmp_path / "weave"
    shutil.copytree(mvtec / "weave", cat)
    monkeypatch.chdir(cat)
    rc, err = cli_all(["train", "--data", ".", "--out", tmp_path / "run", "--steps", 2, *TINY], capsys)
    assert rc == 0, err
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["class_names"] == ["weave"]
    monkeypatch.chdir(cat / "test")
    before = files_under(tmp_path)
    rc, err = cli_all(["test", "--ckpt", tmp_path / "run" / "ckpt.pt", "--data", "..", "--out", tmp_path / "ev",
                   "-K", 1, "-T", 1], capsys)
    assert rc == 0, err
    assert [p.parent.name for p in (tmp_path / "ev").glob("*/scores.csv")] == ["weave"]
    assert [f for f in files_under(tmp_path) if not f.startswith("ev")] == before


def test_same_stem_images_get_their_own_overlays_and_a_rerun_leaves_no_old_ones(trained, mvtec, tmp_path, capsys):
    src = mvtec / "grid" / "test" / "good"
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(src / "000.png", imgs / "a.png")
    Image.open(src / "001.png").convert("RGB").save(imgs / "a.jpg")
    shutil.copy(src / "002.png", imgs / "b.png")
    argv = ["score", "--ckpt", trained, imgs, "--out", tmp_path / "sc", "--category", "grid", "-K", 1, "-T", 1]
    assert cli_all(argv, capsys)[0] == 0
    assert files_under(tmp_path / "sc" / "heatmaps") == ["imgs", "imgs/a.jpg.png", "imgs/a.png.png", "imgs/b.png.png"]
    (imgs / "b.png").unlink()
    assert cli_all(argv, capsys)[0] == 0
    assert files_under(tmp_path / "sc" / "heatmaps") == ["imgs", "imgs/a.jpg.png", "imgs/a.png.png"]


def test_a_rerun_of_test_replaces_the_category_folder(trained, mvtec, tmp_path, capsys):
    argv = ["test", "--ckpt", trained, "--data", mvtec, "--out", tmp_path / "ev", "-K", 1, "-T", 1]
    assert cli_all(argv, capsys)[0] == 0
    stale = tmp_path / "ev" / "grid" / "overlays" / "stale.png"
    stale.write_bytes(b"from an earlier run")
    rc, err = cli_all(argv, capsys)
    assert rc == 0, err
    grid = files_under(tmp_path / "ev" / "grid")
    assert "overlays/stale.png" not in grid and "overlays/scratch/000.png.png" in grid
    hidden = [n for n in os.listdir(tmp_path / "ev") if n.startswith(".")]
    assert sorted(hidden) == [".flow-mismatch", ".lock"]  # nothing left aside


# Atomic writes and staging ------------------------------------------------------------------------

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


def test_checkpoints_take_the_users_umask(tmp_path):
    old = os.umask(0o027)
    try:
        fm.save_checkpoint(tmp_path / "ckpt.pt", {"step": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "ckpt.pt").stat().st_mode & 0o777 == 0o640


# Memory and disk failures -------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"),
                                   OSError(28, "No space left on device", "out/x.json")])
def test_memory_and_disk_failures_are_one_line_with_status_1(monkeypatch, capsys, fault):
    def fails(*args, **kw):
        raise fault

    monkeypatch.setattr(fm, "bench", fails)
    rc, err = cli_all(["bench", "--preset", "tiny", "--device", "cpu"], capsys)
    assert rc == 1 and len(err) == 1 and ("out of memory" in err[0] or "No space left" in err[0]), err


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


# Interrupted runs: signals, divergence, exact resume ----------------------------------------------

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


def test_divergence_names_a_checkpoint_only_when_there_is_one(mvtec, tmp_path):
    data = fm.load_train(mvtec, 16)
    for save_every, says in ((1000, "no checkpoint had been written"), (1, str(tmp_path / "b" / "ckpt.pt"))):
        out = tmp_path / ("a" if save_every == 1000 else "b")
        cfg = fm.TrainConfig(preset="tiny", image_size=16, batch_size=2, steps=50, lr=1e3, save_every=save_every)
        with pytest.raises(fm.UserError, match="diverged") as e:
            fm.train(data, cfg, out, "cpu", log=lambda *_: None)
        assert says in str(e.value) and (out / "ckpt.pt").exists() == (save_every == 1)


# Several processes: torchrun ----------------------------------------------------------------------

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
    for cat in ("grid", "weave"):
        a = np.load(tmp_path / "one" / cat / "heatmaps.npz")
        b = np.load(tmp_path / "two" / cat / "heatmaps.npz")
        assert np.allclose(a["heat"], b["heat"], rtol=1e-5, atol=1e-7)
