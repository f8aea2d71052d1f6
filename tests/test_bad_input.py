"""Bad input: every failure is one line naming the file, flag or key at fault, exit status 2, no
traceback, nothing written damaged. Every input is read as data: images only as PNG, JPEG, BMP or TIFF
from regular files within the pixel budget, as meant (float images by their range, masks by exact
name); checkpoints and their records (calibration, held-out images) checked like flags, never run;
every flag range-checked at parse time; data folders, names, CSV cells and summary rows safe."""

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flow_mismatch as fm
from conftest import ROOT, run_cli

BAD = os.fsdecode(b"bad\xff.png")  # a file name that is not UTF-8
FORMULAS = ['=HYPERLINK("x").png', "+SUM(1,2).png", "@SUM(1).png", "-2.png", "'quoted.png"]
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n"


def assert_user_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert str(needle) in lines[0], lines[0]


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


def one_line(err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def png(path, size=16, value=120):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path, format="PNG")
    return path


def huge_png(path, w=12000, h=12000):
    """A 1-bit PNG of w x h pixels: some kilobytes on disk, 432 MB once decoded to RGB."""
    Image.new("1", (w, h)).save(path, format="PNG")
    return path


def score_in(folder, *args, env=None):
    """`score . ARGS` run in `folder` (paths in scores.csv are then bare file names)."""
    return subprocess.run([sys.executable, str(ROOT / "flow_mismatch.py"), "score", ".", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}, cwd=folder)


# Images: formats, regular files, the pixel budget ----------------------------------------------

@pytest.fixture(scope="module")
def scored(trained, tmp_path_factory):
    """`score` of one folder holding a good image, EPS named .png, a huge PNG, a sub-folder named
    like an image (with an image inside), an empty one, a non-UTF-8 name and names a spreadsheet would
    run; a stand-in `gs` on PATH records any call. Run under the default locale and under LC_ALL=C."""
    tmp = tmp_path_factory.mktemp("scored")
    bin_dir, record = tmp / "bin", tmp / "gs_was_called"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> {record}\nexit 1\n")
    (bin_dir / "gs").chmod(0o755)
    folder = tmp / "incoming"
    png(folder / "good.png")
    (folder / "part_0001.png").write_bytes(EPS)
    huge_png(folder / "huge.png")
    png(folder / "batch7.png" / "inner.png", value=30)
    (folder / "empty.png").mkdir()
    png(folder / BAD, value=90)
    for name in FORMULAS:
        png(folder / name, value=60)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    runs = {}
    for locale, extra in (("default", {}), ("C", {"LC_ALL": "C", "PYTHONUTF8": "0", "LANG": "C"})):
        out = tmp / f"out_{locale}"
        r = score_in(folder, "--ckpt", trained, "--out", out, "--category", "weave", "--device", "cpu",
                     "-K", 1, "-T", 1, env={**env, **extra})
        runs[locale] = (r, out)
    return runs, record, folder


def test_eps_named_png_never_reaches_ghostscript(scored):
    runs, record, _ = scored
    r, out = runs["default"]
    assert not record.exists(), record.read_text()
    assert r.returncode == fm.SKIPPED and "Traceback" not in r.stderr, r.stderr
    [line] = [x for x in r.stderr.splitlines() if "part_0001.png" in x]
    assert "not a supported image" in line


def test_a_png_declaring_a_huge_size_is_one_line_naming_the_budget(scored):
    r, _ = scored[0]["default"]
    assert "DecompressionBomb" not in r.stderr and "Warning" not in r.stderr
    [line] = [x for x in r.stderr.splitlines() if "huge.png" in x]
    assert "12000x12000" in line and "pixel budget" in line and "--max-pixels" in line


def test_folders_are_folders_whatever_their_name(scored):
    r, out = scored[0]["default"]
    with open(out / "scores.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        paths = [row[0] for row in csv.reader(f)][1:]
    assert not any("batch7" in p or "empty" in p or "inner" in p for p in paths), paths
    assert not (out / "heatmaps" / "batch7.png").exists()
    [line] = [x for x in r.stderr.splitlines() if "batch7.png/" in x]
    assert "empty.png/" in line and "skipped" in line


def test_scores_csv_neutralises_formulas_and_a_reader_can_undo_it(scored):
    _, out = scored[0]["default"]
    with open(out / "scores.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.reader(f))[1:]
    cells = {row[0] for row in rows}
    for name in FORMULAS:
        assert "'" + name in cells, (name, cells)
    assert "good.png" in cells  # an ordinary name as it is
    undone = {c[1:] if c.startswith("'") else c for c in cells}
    assert set(FORMULAS) | {"good.png", BAD} <= undone
    assert all(float(row[1]) >= 0 for row in rows if row[1])  # numbers stay numbers


def test_a_non_utf8_name_is_written_as_its_own_bytes_under_any_locale(scored):
    runs, _, _ = scored
    for locale in ("default", "C"):
        r, out = runs[locale]
        assert r.returncode == fm.SKIPPED and "Traceback" not in r.stderr, (locale, r.stderr)
        assert b"\nbad\xff.png," in (out / "scores.csv").read_bytes().replace(b"\r\n", b"\n")
    # the same rows, bytes and scores, whatever the locale
    assert (runs["default"][1] / "scores.csv").read_bytes() == (runs["C"][1] / "scores.csv").read_bytes()


def test_test_writes_names_that_are_not_ascii_or_utf8_under_the_c_locale(trained, mvtec, tmp_path):
    data = tmp_path / "weave"
    shutil.copytree(mvtec / "weave", data)
    good = data / "test" / "good"
    os.rename(good / "000.png", good / BAD)
    os.rename(good / "001.png", good / "caf\u00e9.png")
    r = run_cli("test", "--ckpt", trained, "--data", data, "--out", tmp_path / "ev", "--device", "cpu", "-K", 1,
                "-T", 1, "--no-overlays", env={"LC_ALL": "C", "PYTHONUTF8": "0", "LANG": "C"})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    written = (tmp_path / "ev" / "weave" / "scores.csv").read_bytes()
    assert b"/test/good/bad\xff.png," in written and "/test/good/caf\u00e9.png,".encode() in written


def test_a_fifo_is_named_and_skipped_unopened(trained, tmp_path):
    folder = tmp_path / "in"
    png(folder / "good.png")
    os.mkfifo(folder / "stream.png")  # opening it would wait for a writer forever
    r = run_cli("score", "--ckpt", trained, folder, "--out", tmp_path / "o", "--category", "weave", "--device",
                "cpu", "-K", 1, "-T", 1, timeout=120)
    assert r.returncode == 0, r.stderr
    [line] = [x for x in r.stderr.splitlines() if "stream.png" in x]
    assert "skipped" in line
    r = run_cli("score", "--ckpt", trained, folder / "stream.png", "--out", tmp_path / "o2", "--category", "weave",
                "--device", "cpu", timeout=120)
    assert r.returncode == 2 and "stream.png: not a regular file" in r.stderr and "Traceback" not in r.stderr


def test_the_pixel_budget_is_checked_before_decoding_and_its_flag_raises_it(tmp_path, trained, capsys):
    path = huge_png(tmp_path / "huge.png", 20000, 10000)  # past Pillow's own error limit too
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(fm.UserError, match="huge.png: declares 20000x10000 = 200.0 megapixels, over the pixel"):
            fm.read_image(path, 16)
        budget = fm.MAX_PIXELS
        try:
            fm.MAX_PIXELS = 2 * 10**8
            with fm.open_image(path) as im:  # within a raised budget: opened, Pillow's limits set aside
                assert im.size == (20000, 10000)
        finally:
            fm.MAX_PIXELS = budget
    assert not caught, [str(w.message) for w in caught]
    # the flag: a budget below 16 x 16 refuses the images by name, then nothing is readable
    png(tmp_path / "in" / "a.png")
    assert fm.main(["score", "--ckpt", str(trained), str(tmp_path / "in"), "--out", str(tmp_path / "o"),
                    "--category", "weave", "--device", "cpu", "-K", "1", "-T", "1", "--max-pixels", "100"]) == 2
    err = capsys.readouterr().err
    assert "a.png: declares 16x16" in err and "pixel budget of 0.0001 megapixels" in err
    assert fm.MAX_PIXELS == budget  # the flag holds for its command only
    for bad in ("0", "abc", "1.5", "inf"):
        assert fm.main(["score", "--ckpt", str(trained), str(tmp_path / "in"), "--max-pixels", bad]) == 2
        one_line(capsys.readouterr().err, "--max-pixels")


def test_a_tiff_declaring_a_huge_size_is_refused_as_well(tmp_path):
    path = tmp_path / "scan.tif"
    Image.new("1", (10000, 9000)).save(path, format="TIFF", compression="group4")
    with pytest.raises(fm.UserError, match="scan.tif: declares 10000x9000"):
        fm.read_image(path, 16)


@pytest.mark.parametrize("kind", ["GIF", "WEBP", "ICO"])
def test_other_raster_formats_under_an_image_extension_are_not_decoded(tmp_path, kind):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path, format=kind)
    with pytest.raises(fm.UserError, match="photo.jpg: not a supported image"):
        fm.read_image(path, 16)


def test_only_the_readme_hidden_patterns_are_skipped_silently_and_others_are_named(tmp_path, capsys):
    for name in ("a.png", "__init__.png", ".hidden.png", "._a.png"):
        png(tmp_path / name)
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "dangling.png")
    os.symlink("/dev/zero", tmp_path / "zero.png")
    assert [p.name for p in fm.image_files(tmp_path)] == ["__init__.png", "a.png"]
    err = capsys.readouterr().err
    one_line(err, "skipped 3 entries", "dangling.png", "notes.txt", "zero.png")
    with pytest.raises(fm.UserError, match="zero.png: not a regular file"):
        fm.read_image(tmp_path / "zero.png", 16)


# Checkpoints: validated as data before use ----------------------------------------------------

def record(ckpt, **change):
    """A well-formed calibration record of weave, with `change` applied."""
    return {**dict(scores=[1.0, 2.0], maxima=[3.0, 4.0], paths=["/a.png", "/b.png"], sha256=["0" * 64, "1" * 64],
                   rule=dict(K=1, T=1), step=ckpt["step"]), **change}


def first_weight(c):
    return next(k for k, v in c["model"].items() if v.is_floating_point())


EDITS = {  # id: (edit of the loaded checkpoint, what the one line must name)
    "nan weight": (lambda c: c["model"][first_weight(c)].view(-1).__setitem__(0, math.nan), "'model."),
    "inf weight": (lambda c: c["model"][first_weight(c)].view(-1).__setitem__(0, math.inf), "'model."),
    "nan std": (lambda c: c.update(std=[math.nan, 0.2, 0.2]), "'std[0]'"),
    "inf std": (lambda c: c.update(std=[0.2, math.inf, 0.2]), "'std[1]'"),
    "inf mean": (lambda c: c.update(mean=[0.2, 0.2, -math.inf]), "'mean[2]'"),
    "nan in the optimiser": (lambda c: next(iter(c["optimizer"]["state"].values()))["m"].view(-1)
                             .__setitem__(0, math.nan), "'optimizer.state."),
    "image_size 33": (lambda c: c["train_config"].update(image_size=33), "field 'image_size': 33 is not"),
    "image_size 0": (lambda c: c["train_config"].update(image_size=0), "field 'image_size': must be >= 1"),
    "image_size abc": (lambda c: c["train_config"].update(image_size="abc"), "field 'image_size': 'abc' is not"),
    "tile -8": (lambda c: c["train_config"].update(tile=-8), "field 'tile': must be >= 0"),
    "tile_scale untiled": (lambda c: c["train_config"].update(tile=0, tile_scale=0.5),
                           "field 'tile_scale': give it with --tile N"),
    "lr inf": (lambda c: c["train_config"].update(lr=math.inf), "'train_config.lr'"),
    "preset other": (lambda c: c["train_config"].update(preset="huge"), "field 'preset': 'huge' is not one of"),
    "in_channels 1": (lambda c: c["model_config"].update(in_channels=1), "field 'in_channels'"),
    "num_classes": (lambda c: c["model_config"].update(num_classes=5), "field 'num_classes'"),
    "channel_mult": (lambda c: c["model_config"].update(channel_mult=[1, 2, "x"]), "field 'channel_mult'"),
    "size vs its U-Net": (lambda c: c["model_config"].update(channel_mult=[1, 2, 2, 2, 2, 2]), "field 'image_size'"),
    "class names twice": (lambda c: c.update(class_names=["weave", "weave"]), "'class_names'"),
    "step -1": (lambda c: c.update(step=-1), "'step'"),
    "rule x": (lambda c: c.update(calibration={"weave": record(c, rule="x")}), "'calibration.weave.rule'"),
    "rule K 0": (lambda c: c.update(calibration={"weave": record(c, rule=dict(K=0))}), "'calibration.weave.rule.K'"),
    "no maxima": (lambda c: c.update(calibration={"weave": {k: v for k, v in record(c).items() if k != "maxima"}}),
                  "'calibration.weave.maxima'"),
    "string scores": (lambda c: c.update(calibration={"weave": record(c, scores=["1", "2"])}),
                      "'calibration.weave.scores'"),
    "nan scores": (lambda c: c.update(calibration={"weave": record(c, scores=[math.nan, 1.0])}),
                   "'calibration.weave.scores[0]'"),
    "short maxima": (lambda c: c.update(calibration={"weave": record(c, maxima=[1.0])}),
                     "'calibration.weave.maxima'"),
    "record not a mapping": (lambda c: c.update(calibration={"weave": [1.0]}), "'calibration.weave'"),
    "step as text": (lambda c: c.update(calibration={"weave": record(c, step="6")}), "'calibration.weave.step'"),
    "held_out not a mapping": (lambda c: c.update(held_out={"weave": "x"}), "'held_out.weave'"),
    "held_out lengths": (lambda c: c.update(held_out={"weave": dict(paths=["/a"], sha256=[])}), "'held_out.weave'"),
}


def test_a_well_formed_calibration_record_passes(trained, tmp_path):
    ckpt = torch.load(trained, weights_only=True)
    ckpt["calibration"] = {"weave": record(ckpt)}
    torch.save(ckpt, tmp_path / "ok.pt")
    assert fm.load_checkpoint(tmp_path / "ok.pt")["calibration"]["weave"]["scores"] == [1.0, 2.0]


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_a_checkpoint_edited_with_torch_save_is_one_line_naming_it_and_the_key(trained, tmp_path, edit):
    change, culprit = EDITS[edit]
    ckpt = torch.load(trained, weights_only=True)
    change(ckpt)
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(fm.UserError) as e:
        fm.load_checkpoint(tmp_path / "edited.pt")
    assert str(e.value).startswith(f"--ckpt: {tmp_path / 'edited.pt'}") and culprit in str(e.value), str(e.value)


@pytest.mark.parametrize("command", ["score", "test"])
def test_a_nan_std_is_refused_by_the_commands_with_one_line(trained, mvtec, tmp_path, capsys, command):
    ckpt = torch.load(trained, weights_only=True)
    ckpt["std"] = [math.nan, 0.2, 0.2]
    torch.save(ckpt, tmp_path / "nan.pt")
    target = ["--data", str(mvtec)] if command == "test" else [str(mvtec / "weave" / "test" / "good"),
                                                                "--category", "weave"]
    assert fm.main([command, "--ckpt", str(tmp_path / "nan.pt"), *target, "--out", str(tmp_path / "o"),
                    "--device", "cpu"]) == 2
    one_line(capsys.readouterr().err, "nan.pt", "'std[0]'", "non-finite")
    assert not (tmp_path / "o" / "scores.csv").exists() and not (tmp_path / "o" / "metrics.json").exists()


def flip_bytes_in_a_tensor(src, dst, n=4):
    """dst: src with n bytes of its largest stored tensor inverted in place (the zip's CRC now fails)."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = info.header_offset + 30 + int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    for i in range(start + 64, start + 64 + n):
        data[i] ^= 0xFF
    dst.write_bytes(bytes(data))
    return info.filename


def test_a_checkpoint_with_flipped_bytes_fails_its_crc_by_name(trained, tmp_path):
    member = flip_bytes_in_a_tensor(trained, tmp_path / "flipped.pt")
    with pytest.raises(fm.UserError, match=f"flipped.pt is damaged: its part {member} fails the archive's CRC"):
        fm.load_checkpoint(tmp_path / "flipped.pt")


# Names, summary rows, our own files ------------------------------------------------------------

def fake_test(n=4):
    masks = np.zeros((n, 4, 4), np.uint8)
    masks[1, :2] = masks[3, 1:] = 1
    return fm.Dataset(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.zeros(n, dtype=torch.long), ["x"],
                      [f"{i}.png" for i in range(n)], np.array([0, 1, 0, 1]), masks,
                      mask_files=[[], ["m"], [], ["m"]])


def test_a_category_named_mean_keeps_its_row_beside_the_mean():
    rng = np.random.default_rng(0)
    tests = {"mean": fake_test(), "wood": fake_test()}
    scored = {"mean": (rng.uniform(size=(4, 4, 4)).astype(np.float32), np.array([0.1, 0.9, 0.2, 0.8])),
              "wood": (rng.uniform(size=(4, 4, 4)).astype(np.float32), np.array([0.9, 0.1, 0.8, 0.2]))}
    results = fm.metrics_of(tests, scored)
    assert results["mean"]["image_auroc"] == 1.0 and results["wood"]["image_auroc"] == 0.0
    assert results[fm.MEAN]["image_auroc"] == 0.5 and results[fm.MEAN]["categories"]["image_auroc"] == 2
    rows = [line.split("|")[1].strip() for line in fm.format_table(results).splitlines()[2:]]
    assert rows == ["mean", "wood", "mean"]  # the category, then the summary, last
    assert json.loads(json.dumps(results)).keys() == {"mean", "wood", fm.MEAN}


@pytest.mark.parametrize("value, shown", [('"0.95"', '"0.95"'), ("[0.95]", "[0.95]"), ("true", "true"),
                                          ("NaN", "NaN"), ("Infinity", "Infinity"), ("1.5", "1.5")])
def test_compare_refuses_a_metric_that_is_not_a_number_in_0_1(tmp_path, capsys, value, shown):
    m = {k: 0.9 for k in fm.METRICS}
    text = json.dumps({"bottle": m, fm.MEAN: m}).replace('"image_ap": 0.9', f'"image_ap": {value}', 1)
    (tmp_path / "metrics.json").write_text(text)
    assert fm.main(["compare", str(tmp_path / "metrics.json"), "--dataset", "mvtec"]) == 2
    one_line(capsys.readouterr().err, "metrics.json", "'bottle.image_ap'", shown)


def write_1cls(root, rows, encoding="utf-8"):
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    text = "object,split,label,image,mask\n" + "".join(r + "\n" for r in rows)
    (root / "split_csv" / "1cls.csv").write_bytes(text.encode(encoding))


@pytest.mark.parametrize("rows, encoding, needle", [
    (["candle,train,normal,candle/Data/Images/Normal/caf\xe9.JPG,"], "latin-1", "not a UTF-8 CSV table"),
    (["candle,train,normal"], "utf-8", "line 2 does not hold the 5 cells"),
    (["candle,train,normal,a.JPG,,extra"], "utf-8", "line 2 does not hold the 5 cells"),
    (["candle,train,normal,,"], "utf-8", "line 2 does not hold the 5 cells"),
    (["candle,train,bad,a.JPG,"], "utf-8", "line 2: split 'train' or label 'bad'"),
])
def test_a_damaged_1cls_csv_names_the_file_and_the_row(tmp_path, rows, encoding, needle):
    write_1cls(tmp_path, rows, encoding)
    with pytest.raises(fm.UserError, match=f"1cls.csv: {needle}"):
        fm.visa_categories(tmp_path)


def test_a_damaged_train_log_is_rebuilt_with_one_warning_on_resume(trained, mvtec, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained.parent, run)
    log = run / "train_log.csv"
    log.write_bytes(log.read_bytes() + b"garbage\xff,row\n4,abc,0.1,1,1\n")
    r = run_cli("train", "--resume", run, "--steps", 8, "--device", "cpu")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    [line] = [x for x in r.stderr.splitlines() if "train_log.csv" in x]
    assert "2 damaged line(s) dropped" in line
    rows = list(csv.reader(io.StringIO(log.read_text())))
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 9)) and (run / "loss.png").stat().st_size > 0


def test_loss_png_is_drawn_from_a_damaged_log_with_one_warning(tmp_path, capsys):
    (tmp_path / "train_log.csv").write_text("step,loss,lr,images_per_s,wall_s\n"
                                            "1,0.5,1e-3,1,1\n2,x,1,1,1\n3,0.4,1e-3,1,2\n")
    fm.plot_loss(tmp_path)
    assert (tmp_path / "loss.png").stat().st_size > 0
    one_line(capsys.readouterr().err, "train_log.csv", "1 damaged line(s) dropped", "2 rows")


def test_the_training_log_is_readable_as_each_step_ends(mvtec, tmp_path, monkeypatch):
    seen, step = [], fm.cfm_step

    def spying(*args, **kw):  # before each step: the rows of the steps already done
        seen.append((tmp_path / "run" / "train_log.csv").read_text().splitlines()[1:])
        return step(*args, **kw)

    monkeypatch.setattr(fm, "cfm_step", spying)
    fm.train(mvtec, fm.train_config("tiny", image_size=16, steps=3, batch_size=2), tmp_path / "run", "cpu",
             log=lambda line: None)
    assert [len(rows) for rows in seen] == [0, 1, 2]


# From Python -----------------------------------------------------------------------------------

@pytest.mark.parametrize("images, chunk, needle", [
    (torch.rand(0, 3, 32, 32), 32, "images: Tensor of shape (0, 3, 32, 32) holds no pixels"),
    (np.zeros((10, 0, 3), np.uint8), 32, "images: ndarray of shape (10, 0, 3) holds no pixels"),
    (np.zeros((0, 8, 8, 3), np.uint8), 32, "holds no pixels"),
    (Image.new("RGB", (0, 4)), 32, "images: a PIL image of size (0, 4) holds no pixels"),
    (np.zeros((8, 8, 3), np.uint8), -1, "chunk: images scored at a time must be a positive integer, got -1"),
    (np.zeros((8, 8, 3), np.uint8), 0, "chunk: "),
    (np.zeros((8, 8, 3), np.uint8), 1.5, "chunk: "),
    (np.zeros((8, 8, 3), np.uint8), True, "chunk: "),
])
def test_predict_refuses_what_the_cli_would_with_user_error(trained, images, chunk, needle):
    detector = fm.load(trained, "cpu")
    with pytest.raises(fm.UserError) as e:
        detector.predict(images, category="weave", chunk=chunk, K=1, T=1)
    assert needle in str(e.value), str(e.value)


# Data folders, masks, checkpoints, --out: one line naming the culprit -----------------------------

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


# Checkpoints that would run code or were altered --------------------------------------------------

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


# Calibration is bound to the images and weights it checked ----------------------------------------

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


# Flags: ranges at parse time, no traceback, nothing written; truthful messages --------------------

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
        (sc + ["--alarm-rate", "x"], "--alarm-rate"),  # out of range: test_an_alarm_rate_outside_0_1_...
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


def nothing_read(monkeypatch, checkpoints=True):
    """From here on, decoding an image (or, with checkpoints, loading a checkpoint) fails the test."""
    def read(*args, **kwargs):
        raise AssertionError("work began before the arguments were checked")
    monkeypatch.setattr(fm, "_load", read)
    if checkpoints:
        monkeypatch.setattr(fm, "load_checkpoint", read)


def refused(call, capsys):
    """The one line `call` is refused with: str(UserError) from Python, the CLI's error line without its prefix."""
    try:
        rc = call()
    except fm.UserError as e:
        return str(e)
    except SystemExit as e:
        rc = e.code
    err = said(capsys.readouterr().err.splitlines())
    assert rc == 2 and len(err) == 1, (rc, err)
    return err[0].split("error: ", 1)[1]


ALARM_CALLS = {  # name: call with alarm rate A and a folder `o` to write nothing into (predict: a loaded detector)
    "test": lambda ck, d, A, o: fm.main(["test", "--ckpt", str(ck), "--data", str(d), "--out", str(o),
                                         "--alarm-rate", str(A)]),
    "score": lambda ck, d, A, o: fm.main(["score", "--ckpt", str(ck), str(d / "weave" / "test" / "good"),
                                          "--out", str(o), "--category", "weave", "--alarm-rate", str(A)]),
    "export": lambda ck, d, A, o: fm.main(["export", "--ckpt", str(ck), "--category", "weave", "--out",
                                           str(o / "w.pt2"), "--alarm-rate", str(A)]),
    "evaluate": lambda ck, d, A, o: fm.evaluate(ck, d, o, fm.ScoreConfig(), "cpu", alarm_rate=A),
    "fm.score": lambda ck, d, A, o: fm.score(ck, d / "weave" / "test" / "good", o, category="weave", alarm_rate=A),
    "fm.export": lambda ck, d, A, o: fm.export(ck, o / "w.pt2", "weave", A),
    "predict": lambda detector, d, A, o: detector.predict(d / "weave" / "test" / "good", "weave", A),
}


@pytest.mark.parametrize("rate", [0.0, 1.0, math.nan, -0.1, "abc"])
@pytest.mark.parametrize("call", ALARM_CALLS)
def test_a_bad_alarm_rate_is_one_line_before_any_work_from_every_command_and_python(trained, mvtec, tmp_path,
                                                                                     monkeypatch, capsys, call, rate):
    ckpt = fm.load(trained, "cpu") if call == "predict" else trained
    nothing_read(monkeypatch)
    line = refused(lambda: ALARM_CALLS[call](ckpt, mvtec, rate, tmp_path / "o"), capsys)
    assert line == ("--alarm-rate: 'abc' is not a number" if rate == "abc" else
                    f"--alarm-rate: must be > 0 and < 1, got {rate}")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tiled(trained, tmp_path_factory):
    """`trained` as if trained on 8 x 8 tiles (train --tile 8): it scores each 16 x 16 image by its tiles."""
    ckpt = torch.load(trained, weights_only=True)
    ckpt["train_config"]["tile"] = 8
    path = tmp_path_factory.mktemp("tiled") / "ckpt.pt"
    torch.save(ckpt, path)
    return path


STRIDE_CALLS = {  # name: call with a tiled checkpoint, data and a folder `o` to write nothing into
    "test": lambda ck, d, o: fm.main(["test", "--ckpt", str(ck), "--data", str(d), "--out", str(o), "--stride", "9"]),
    "ablation": lambda ck, d, o: fm.main(["test", "--ckpt", str(ck), "--data", str(d), "--out", str(o),
                                          "--stride", "9", "--grid-K", "1,2"]),
    "score": lambda ck, d, o: fm.main(["score", "--ckpt", str(ck), str(d / "weave" / "test" / "good"),
                                       "--out", str(o), "--category", "weave", "--stride", "9"]),
    "calibrate": lambda ck, d, o: fm.main(["calibrate", "--ckpt", str(ck), "--data", str(d / "weave" / "train" / "good"),
                                           "--category", "weave", "--stride", "9"]),
    "explain": lambda ck, d, o: fm.main(["explain", "--ckpt", str(ck), str(next((d / "weave" / "test" / "good")
                                         .iterdir())), "--out", str(o / "fig.png"), "--category", "weave",
                                         "--stride", "9"]),
    "evaluate": lambda ck, d, o: fm.evaluate(ck, d, o, fm.ScoreConfig(stride=9), "cpu"),
    "fm.explain": lambda ck, d, o: fm.explain(ck, next((d / "weave" / "test" / "good").iterdir()), o / "fig.png",
                                              fm.ScoreConfig(stride=9), category="weave"),
    "predict": lambda ck, d, o: fm.load(ck, "cpu").predict(np.zeros((16, 16, 3), np.uint8), "weave", stride=9),
}


@pytest.mark.parametrize("call", STRIDE_CALLS)
def test_a_stride_beyond_the_tile_is_one_line_before_any_image_is_read(tiled, mvtec, tmp_path, monkeypatch, capsys,
                                                                        call):
    monkeypatch.chdir(tmp_path)
    nothing_read(monkeypatch, checkpoints=False)
    before = tiled.read_bytes()
    line = refused(lambda: STRIDE_CALLS[call](tiled, mvtec, tmp_path / "o"), capsys)
    assert line == "--stride: 9 must be from 1 to the tile size 8 (0: half a tile), or pixels go unscored"
    assert not (tmp_path / "o").exists() and tiled.read_bytes() == before
    assert fm.load(tiled, "cpu").fit(fm.ScoreConfig(stride=8)).stride == 8  # the tile itself is a stride


def test_an_ablation_checks_every_checkpoint_before_it_scores_the_first(trained, tiled, mvtec, tmp_path, monkeypatch,
                                                                         capsys):
    nothing_read(monkeypatch, checkpoints=False)
    ablation = ["test", "--ckpt", str(trained), "--data", str(mvtec), "--out", str(tmp_path / "o")]
    line = refused(lambda: fm.main([*ablation, "--ckpt", str(tiled), "--stride", "9"]), capsys)
    assert line == "--stride: 9 must be from 1 to the tile size 8 (0: half a tile), or pixels go unscored"
    line = refused(lambda: fm.main([*ablation, "--ckpt", str(tmp_path / "missing.pt")]), capsys)
    assert "missing.pt" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("call", [
    lambda ck, d, o: fm.main(["test", "--ckpt", str(ck), "--data", str(d), "--out", str(o), "--aggregator",
                              "quantile:2"]),
    lambda ck, d, o: fm.ScoreConfig(aggregator="quantile:2"),
    lambda ck, d, o: fm.load(ck, "cpu").predict(np.zeros((16, 16, 3), np.uint8), "weave", aggregator="quantile:2"),
])
def test_a_knob_whose_own_check_fails_names_its_flag_once(trained, mvtec, tmp_path, monkeypatch, capsys, call):
    nothing_read(monkeypatch, checkpoints=False)
    line = refused(lambda: call(trained, mvtec, tmp_path / "o"), capsys)
    assert line == "--aggregator: 'quantile:2' is not min, mean or quantile:ALPHA with 0 < ALPHA <= 1"
    line = refused(lambda: fm.main(["test", "--ckpt", str(trained), "--data", str(mvtec), "--out", str(tmp_path / "o"),
                                    "--aggregators", "min,quantile:2"]), capsys)
    assert line.startswith("--aggregators: 'quantile:2' is not") and line.count("--aggregator") == 1, line


def test_a_calibration_rule_refused_by_its_knobs_check_names_the_record_key(trained, tmp_path):
    ckpt = torch.load(trained, weights_only=True)
    ckpt["calibration"] = {"weave": record(ckpt, rule=dict(aggregator="quantile:2"))}
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(fm.UserError) as e:
        fm.load_checkpoint(tmp_path / "edited.pt")
    assert str(e.value).endswith(": key 'calibration.weave.rule.aggregator': 'quantile:2' is not min, mean or "
                                 "quantile:ALPHA with 0 < ALPHA <= 1") and "--aggregator" not in str(e.value), e.value


@pytest.fixture(scope="module")
def single(mvtec, tmp_path_factory):
    """An unconditional model of one category (weave)."""
    run = tmp_path_factory.mktemp("single")
    cfg = fm.TrainConfig(preset="tiny", image_size=16, batch_size=2, steps=2)
    return fm.train(fm.load_train(mvtec / "weave", 16), cfg, run, "cpu", log=lambda *_: None)


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


# Inputs read as meant: unreadable files skipped by name, exact mask names, float images, means ----

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
    assert len(err) == 3 and "001.png" in err[0] and "002.png" in err[1] and "skipped" in err[0], err
    assert "--alarm-rate" in err[2]  # the one line on how to get decisions, none having been asked for
    rows = list(csv.DictReader(open(tmp_path / "sc" / "scores.csv")))
    assert [r["score"] != "" for r in rows] == [True, False, False, True]
    assert files_under(tmp_path / "sc" / "heatmaps") == ["line", "line/000.png.png", "line/003.png.png"]


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


def test_two_mask_folders_up_to_case_one_empty_are_one_line_naming_both(tmp_path):
    """MVTec LOCO keeps an image's masks in a folder <name>/; an empty one is named, not indexed into."""
    gt = tmp_path / "ground_truth"
    (gt / "Ab").mkdir(parents=True)
    write_png(gt / "aB" / "000.png", 255)
    with pytest.raises(fm.UserError, match=r"ab\.png: no mask of exactly its name, and two up to case: .*Ab, .*aB"):
        fm.match_masks([tmp_path / "x" / "ab.png"], gt)


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
