"""One scoring rule everywhere, and `export`: an image's score does not depend on where it stands
or how it is called, and the exported archive gives `score --alarm-rate`'s numbers with torch alone."""

import csv
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import flow_mismatch as fm

A, RULE = 0.2, fm.ScoreConfig(K=2, T=2)


@pytest.fixture(scope="module")
def calibrated(trained, tmp_path_factory):
    """A copy of the tiny trained run, calibrated for weave at K = T = 2 on 9 fresh normal images,
    and 4 more fresh normal images plus one defective one to score."""
    tmp = tmp_path_factory.mktemp("export")
    shutil.copy(trained, tmp / "ckpt.pt")
    fresh = fm.make_demo_dataset(tmp / "fresh", size=16, n_train=13, n_test=2, seed=3) / "weave"
    calib, new = tmp / "calib", tmp / "new"
    for i, f in enumerate(sorted((fresh / "train/good").glob("*.png"))):
        (calib if i < 9 else new).mkdir(exist_ok=True)
        shutil.copy(f, (calib if i < 9 else new) / f.name)
    shutil.copy(next((fresh / "test/stain").glob("*.png")), new / "stain.png")
    fm.calibrate(tmp / "ckpt.pt", calib, "weave", RULE, "cpu", log=lambda s: None)
    return tmp / "ckpt.pt", new


@pytest.fixture(scope="module")
def exported(calibrated):
    ckpt, _ = calibrated
    meta = fm.export(ckpt, ckpt.parent / "weave.pt2", "weave", A, RULE, log=lambda s: None)
    return ckpt.parent / "weave.pt2", meta


def scores_csv(folder):
    with open(folder / "scores.csv") as f:
        return {Path(r["path"]).name: r for r in csv.DictReader(f)}


def test_an_image_scores_the_same_alone_in_a_folder_at_any_position_and_frame_by_frame(calibrated, tmp_path):
    ckpt, new = calibrated
    files = sorted(new.glob("*.png"))
    target = files[0]
    got = []
    for position in range(3):  # the target as the 1st, 2nd and 3rd file of a folder
        folder = tmp_path / f"at{position}"
        folder.mkdir()
        others = iter(files[1:])
        for i in range(3):
            shutil.copy(target if i == position else next(others), folder / f"{i}.png")
        fm.score(ckpt, folder, tmp_path / f"out{position}", RULE, "weave", log=lambda s: None)
        got.append(float(scores_csv(tmp_path / f"out{position}")[f"{position}.png"]["score"]))
    detector = fm.load(ckpt, "cpu")
    alone = detector.predict(target, "weave", K=2, T=2).pred_score[0]
    frames = [detector.predict(f, "weave", K=2, T=2).pred_score[0] for f in files]  # one call per frame
    together = detector.predict(files, "weave", K=2, T=2).pred_score
    np.testing.assert_allclose(got, alone, rtol=1e-5)  # forward batches of other sizes: float rounding only
    np.testing.assert_allclose(frames, together, rtol=1e-5)
    assert frames[0] == alone


def test_export_alone_gives_score_alarm_rate_results_at_two_batch_sizes(calibrated, exported, tmp_path):
    ckpt, new = calibrated
    archive, meta = exported
    fm.score(ckpt, new, tmp_path / "ref", RULE, "weave", A, log=lambda s: None)
    rows = scores_csv(tmp_path / "ref")
    assert meta["parity"]["map_max_rel_diff"] <= 1e-5 and meta["parity"]["decisions_by_rule"] is True
    assert meta["calibration_size"] == 9 and meta["rule"]["K"] == 2 and meta["alarm_rate"] == A
    code = f"""
import importlib.util, json, sys, numpy as np, torch
from PIL import Image
assert importlib.util.find_spec("flow_mismatch") is None, "flow_mismatch is importable"
meta = {{"metadata.json": ""}}
program = torch.export.load({str(archive)!r}, extra_files=meta).module()
S = json.loads(meta["metadata.json"])["image_size"]
names = {sorted(rows)!r}
x = torch.stack([torch.from_numpy(np.asarray(Image.open({str(new)!r} + "/" + n).convert("RGB")
                 .resize((S, S), Image.BILINEAR))).permute(2, 0, 1) for n in names])
out = {{}}
with torch.no_grad():
    for b in (1, 3):
        parts = [program(x[i:i + b]) for i in range(0, len(x), b)]
        out[b] = {{k: torch.cat([p[k] for p in parts]).tolist() for k in ("pred_score", "p_value", "pred_label")}}
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    for got in json.loads(r.stdout).values():
        for i, name in enumerate(sorted(rows)):
            assert got["pred_score"][i] == pytest.approx(float(rows[name]["score"]), rel=1e-5)
            assert got["p_value"][i] == pytest.approx(float(rows[name]["p_value"]), abs=1e-12)
            assert int(got["pred_label"][i]) == int(rows[name]["anomalous"])
    # the archive through the project: fm.load(...).predict and `score --ckpt x.pt2`, the same numbers
    pred = fm.load(archive).predict(new, alarm_rate=A)
    fm.score(archive, new, tmp_path / "arch", log=lambda s: None)  # the archive's own rule
    scored = scores_csv(tmp_path / "arch")
    for i, path in enumerate(pred.image_path):
        name = Path(path).name
        assert pred.pred_score[i] == pytest.approx(float(rows[name]["score"]), rel=1e-5)
        assert int(pred.pred_label[i]) == int(rows[name]["anomalous"])
        assert float(scored[name]["score"]) == pytest.approx(float(rows[name]["score"]), rel=1e-5)
    with pytest.raises(fm.UserError, match="-K"):
        fm.load(archive).predict(new, K=3)


def test_a_calibration_of_the_old_noise_rule_is_refused(calibrated, tmp_path):
    ckpt, new = calibrated
    state = torch.load(ckpt, weights_only=True)
    del state["calibration"]["weave"]["noise"]  # as recorded before the rule
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(fm.UserError, match=r"older rule .* calibrate --ckpt"):
        fm.load(tmp_path / "old.pt", "cpu").predict(new, "weave", A, K=2, T=2)


class Marker:
    """Unpickling this creates a file: code run while loading."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("how", ["sample_inputs", "extra_entry", "weights_config_not_a_mapping"])
def test_an_archive_with_pickled_entries_is_refused_before_anything_is_loaded(exported, tmp_path, how):
    archive, _ = exported
    marker, bad = tmp_path / "ran", tmp_path / "bad.pt2"
    payload = pickle.dumps(Marker(marker))
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(bad, "w") as dst:
        root = src.namelist()[0].split("/")[0]
        for item in src.infolist():
            body = src.read(item)
            if how == "sample_inputs" and "/data/sample_inputs/" in item.filename:
                body = payload
            if how == "weights_config_not_a_mapping" and item.filename.endswith("_weights_config.json"):
                body = json.dumps({"config": {"weight_0": 3}})  # damaged: one line, not a traceback
            dst.writestr(item, body)
        if how == "extra_entry":
            dst.writestr(f"{root}/data/evil.pkl", payload)
    with pytest.raises(fm.UserError, match="refused"):
        fm.load(bad)
    assert not marker.exists()


@pytest.mark.parametrize("metadata", ['{"format": "other"}', '["a list"]', "not json"])
def test_an_archive_of_another_format_is_refused_even_under_python_O(exported, tmp_path, metadata):
    """The format check is a test of ours, not an assert: `python -O` (which drops asserts) refuses too."""
    archive, _ = exported
    bad = tmp_path / "other.pt2"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, metadata if item.filename.endswith("extra/metadata.json") else src.read(item))
    run = subprocess.run([sys.executable, "-O", "-c", f"import flow_mismatch as fm; fm.load({str(bad)!r})"],
                         capture_output=True, text=True, cwd=Path(fm.__file__).parent)
    assert run.returncode == 1 and "UserError" in run.stderr and "is not a flow-mismatch export" in run.stderr


@pytest.mark.parametrize("kwargs, flag", [(dict(smooth=2.0), "--smooth"), (dict(K=3), "-K"), (dict(chunk=0), "chunk"),
                                          (dict(ode_steps=0), "--ode-steps")])
def test_an_archive_refuses_what_it_would_not_do_before_any_image_is_read(exported, tmp_path, kwargs, flag):
    """An archive holds one rule and no smoothing: a different rule, a smoothing it would silently skip, or a
    bad value of any flag is one line naming the flag, from the call itself (no image is read: none exists)."""
    with pytest.raises(fm.UserError) as e:
        fm.load(exported[0]).stream([tmp_path / "absent.png"], **kwargs)
    assert str(e.value).startswith(flag + ":"), e.value


class NaNMaps:
    """An archive whose maps came out NaN (a broken kernel): parity must refuse it, not pass it."""

    def __init__(self, archive):
        self.archive = archive

    def run(self, images):
        out = self.archive.run(images)
        return {**out, "anomaly_map": torch.full_like(out["anomaly_map"], math.nan)}


def test_parity_refuses_an_archive_whose_maps_are_nan(calibrated, exported):
    ckpt, new = calibrated
    detector, images = fm.load(ckpt, "cpu"), fm.uint8_batch([a for a, _ in fm._load(fm.image_files(new), 16)])
    archive = NaNMaps(fm.load(exported[0]))
    label = fm.category_label(detector.ckpt, "weave")
    with pytest.raises(fm.UserError, match="disagrees") as e:
        fm.parity(archive, detector, RULE, images, label, None, None)
    assert e.value.status == 1


@pytest.mark.skipif(not os.environ.get("FM_INDUCTOR_TESTS"),
                    reason="an AOTInductor compile of even this U-Net takes minutes on 2 cores; FM_INDUCTOR_TESTS=1 runs it")
def test_export_aoti_writes_a_package_that_gives_the_archive_s_outputs_with_its_input_checks_on(calibrated, tmp_path):
    ckpt, new = calibrated
    out = tmp_path / "weave.pt2"
    meta = fm.export(ckpt, out, "weave", A, RULE, new, log=lambda s: None, aoti=True)  # the calibration's K = T = 2
    package = tmp_path / "weave.aoti.pt2"
    assert meta["aoti"]["file"] == package.name and meta["aoti"]["parity"]["decisions_by_rule"] is True
    assert max(meta["aoti"]["parity"]["map_max_rel_diff"], meta["aoti"]["parity"]["score_max_rel_diff"]) <= 1e-5
    assert fm.check_archive(out)["aoti"] == meta["aoti"]
    x = fm.uint8_batch([a for a, _ in fm._load(sorted(new.glob("*.png")), meta["image_size"])])
    runner = fm.Package(package)
    for b in (1, 3):
        got, want = runner.run(x[:b]), fm.Archive(out).run(x[:b])
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]) if want[k].dtype == torch.bool else \
                torch.allclose(got[k], want[k], rtol=1e-5, atol=0), k
    with pytest.raises(RuntimeError, match="dtype"):  # the checks are on: a float image is refused
        runner.run(x[:1].float())


def test_aoti_without_a_compiler_is_refused_in_one_line_before_anything_is_written(calibrated, tmp_path, monkeypatch):
    ckpt, _ = calibrated
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "out" / "weave.pt2"
    with pytest.raises(fm.UserError, match=r"^--aoti: no C\+\+ compiler") as e:
        fm.export(ckpt, out, "weave", A, RULE, log=lambda s: None, aoti=True)
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
