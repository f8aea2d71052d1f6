"""Large images: tiled scoring (grid, blending window, stitching, path seeds), maps written at the
original size in the official layouts, tiled training end to end."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import flow_mismatch as fm
from conftest import run_cli


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = fm.build_model("tiny").eval()
    for p in m.parameters():
        if not p.any():  # undo the zero initialisations: non-trivial velocities
            torch.nn.init.normal_(p, std=0.05)
    return m


def dataset(images):
    return fm.Dataset(images, torch.zeros(len(images), dtype=torch.long), ["c"], [f"{i}.png" for i in range(len(images))])


def score(model, images, tile, **cfg):
    cfg = fm.ScoreConfig(**{"K": 2, "T": 2, **cfg})
    return fm.score_dataset(model, dataset(images), cfg, torch.zeros(3), torch.ones(3) / 64, "cpu", tile=tile)


def test_tile_grid_covers_the_image_with_edge_tiles_at_the_border():
    grid = fm.tile_grid(37, 50, 16, 8)
    assert sorted({t for t, _ in grid}) == [0, 8, 16, 21] and sorted({left for _, left in grid}) == [0, 8, 16, 24, 32, 34]
    cover = np.zeros((37, 50), int)
    for top, left in grid:
        cover[top:top + 16, left:left + 16] += 1
    assert cover.min() >= 1


def test_stitching_a_constant_tile_map_gives_a_constant_map():
    images = [torch.zeros(3, 37, 50, dtype=torch.uint8), torch.zeros(3, 16, 16, dtype=torch.uint8)]
    maps = fm.tiled_maps(lambda x, ids, cells: torch.full((len(x), 16, 16), 2.5), images, 16, 8, per_call=5)
    assert [m.shape for m in maps] == [(37, 50), (16, 16)]
    for m in maps:
        assert torch.allclose(m, torch.full_like(m, 2.5), rtol=1e-6)


def test_stitched_map_of_a_tile_periodic_image_is_tile_periodic(monkeypatch):
    """Fake scorer: the tile's grey level times a bump that depends on the position inside the tile
    (like a network's border effects). A period-N image gives a period-N map, away from the borders."""
    N = 16
    ramp = 1 + torch.linspace(0, 1, N)[:, None] * torch.linspace(1, 0, N)[None, :]
    monkeypatch.setitem(fm.SCORERS, "mismatch", lambda model, y, labels, cfg, ids: y.mean(1) * ramp)
    period = torch.randint(0, 255, (3, N, N), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    image = period.repeat(1, 4, 5)  # (3, 64, 80)
    heat, _ = score(None, image[None], N, max_batch=1000)
    interior = heat[0, N // 2:-N // 2, N // 2:-N // 2]
    assert torch.allclose(interior[N:], interior[:-N], atol=1e-5)
    assert torch.allclose(interior[:, N:], interior[:, :-N], atol=1e-5)


def test_tiles_with_different_levels_leave_no_seam(monkeypatch):
    """Each tile's map a random constant: the window blends them, so neighbouring pixels differ by a
    small part of the tiles' spread, never by a jump at a tile's edge (a plain average jumps by 1/4)."""
    monkeypatch.setitem(fm.SCORERS, "mismatch", lambda model, y, labels, cfg, places: torch.stack(
        [torch.full(y.shape[-2:], np.random.default_rng(p).uniform()) for p in places]))
    heat, _ = score(None, torch.zeros(1, 3, 96, 96, dtype=torch.uint8), 32, max_batch=1000)
    jumps = max(heat[0].diff(dim=0).abs().max(), heat[0].diff(dim=1).abs().max())
    assert jumps < 0.1


def test_image_of_exactly_one_tile_scores_as_untiled(model):
    images = torch.randint(0, 255, (2, 3, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    tiled, s_tiled = score(model, images, 16)
    plain, s_plain = score(model, images, 0)
    assert torch.allclose(tiled, plain, rtol=1e-6, atol=1e-6) and torch.allclose(s_tiled, s_plain, rtol=1e-6)


def test_tile_order_and_batch_composition_do_not_change_the_map(model):
    images = torch.randint(0, 255, (2, 3, 24, 40), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    ref, _ = score(model, images, 16, max_batch=4)  # one tile per forward batch
    for max_batch in (12, 1000):  # three tiles; every tile of both images at once
        out, _ = score(model, images, 16, max_batch=max_batch)
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    y = images.float() * 64 / 255

    def fn(x, places, cells):
        return fm.mismatch_heat(model, x, None, fm.ScoreConfig(K=2, T=2), places)

    backwards = fm.tiled_maps(fn, [y[1], y[0]], 16, 8, per_call=7)  # images, and so tiles, reversed
    assert torch.allclose(backwards[0], ref[1], rtol=1e-5, atol=1e-6)
    assert torch.allclose(backwards[1], ref[0], rtol=1e-5, atol=1e-6)


def test_smooth_0_is_the_identity_and_smooth_sigma_turns_an_impulse_into_the_gaussian():
    """--smooth sigma convolves with the normalised Gaussian: a unit impulse keeps its mass 1 and its
    peak becomes 1 / (2 pi sigma^2) (the sampled kernel's peak differs from it by < 1e-4 at sigma 2)."""
    heat = torch.zeros(2, 21, 21)
    heat[:, 10, 10] = 1
    assert fm.smooth_maps(heat, 0) is heat
    out = fm.smooth_maps(heat, 2.0)
    assert out.shape == heat.shape and torch.allclose(out.sum((1, 2)), torch.ones(2), atol=1e-5)
    assert abs(float(out[0, 10, 10]) - 1 / (2 * math.pi * 4)) < 1e-4
    assert [m.shape for m in fm.smooth_maps([heat[0], heat[1, :9]], 2.0)] == [(21, 21), (9, 21)]  # sizes may differ


def test_smoothing_comes_before_the_image_score(model):
    """The tiled scorer with --smooth returns the smoothed map, and S (Eq. 4) is computed on it."""
    images = torch.randint(0, 255, (2, 3, 24, 40), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    raw, s_raw = score(model, images, 16)
    heat, s = score(model, images, 16, smooth=1.5)
    assert torch.allclose(heat, fm.smooth_maps(raw, 1.5), rtol=1e-6, atol=1e-7)
    assert torch.allclose(s, fm.image_score(heat), rtol=1e-6)
    assert not torch.allclose(s, s_raw, rtol=1e-3)


def test_explain_shows_the_smoothed_map_and_score_of_the_scorer(model):
    images = torch.randint(0, 255, (1, 3, 16, 16), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    cfg = fm.ScoreConfig(K=2, T=2, smooth=1.0)
    heat, s = fm.score_dataset(model, dataset(images), cfg, torch.zeros(3), torch.ones(3) / 64, "cpu")
    e = fm.explain_maps(model, fm.normalise(images, torch.zeros(3), torch.ones(3) / 64), None, cfg)
    assert torch.allclose(e["heat"], heat[0], rtol=1e-5, atol=1e-7) and math.isclose(e["score"], float(s[0]), rel_tol=1e-5)


def test_a_calibration_scored_without_smoothing_is_refused_with_it():
    rule = {f: getattr(fm.ScoreConfig(), f) for f in fm.SCORE_RULE}
    cal = dict(step=5, scores=list(np.linspace(0, 1, 19)), maxima=list(np.linspace(0, 1, 19)), rule=rule,
               noise=fm.NOISE_RULE)
    ckpt = dict(class_names=["c"], step=5, calibration={"c": cal})
    assert fm.calibration_of(ckpt, "c", fm.ScoreConfig(), "ckpt.pt", 0.1) is cal
    with pytest.raises(fm.UserError, match="--smooth 0.0"):
        fm.calibration_of(ckpt, "c", fm.ScoreConfig(smooth=2.0), "ckpt.pt", 0.1)


def test_tile_cells_name_the_grid_cell_of_the_tile_centre():
    # 128 x 96 image, 32 px tiles, 4 x 4 grid (cells 32 x 24 px): centres (16, 16), (112, 80), (64, 40), (48, 24)
    boxes = [(0, 0, 128, 96), (96, 64, 128, 96), (48, 24, 128, 96), (32, 8, 128, 96)]
    assert fm.tile_cells(boxes, 32, 4).tolist() == [0, 3 * 4 + 3, 2 * 4 + 1, 1 * 4 + 1]
    assert fm.position_labels(torch.tensor([0, 2]), torch.tensor([3, 5]), 4).tolist() == [3, 2 * 16 + 5]
    assert fm.position_labels(None, torch.tensor([3]), 4).tolist() == [3]


def test_position_conditioned_training_embeds_category_times_cell(mvtec, tmp_path):
    data = fm.load_train(mvtec, None, tile=8)
    cfg = fm.TrainConfig(preset="tiny", image_size=8, batch_size=4, steps=2, tile=8, tile_grid=2)
    ckpt = fm.load_checkpoint(fm.train(data, cfg, tmp_path / "run", "cpu", log=lambda *_: None))
    assert ckpt["model_config"]["num_classes"] == 2 * 4 and ckpt["train_config"]["tile_grid"] == 2
    model = fm.model_from_checkpoint(ckpt).eval()
    seen = []
    forward = model.forward
    model.forward = lambda x, t, labels=None: seen.append(labels) or forward(x, t, labels)
    test = fm.load_test(mvtec, None, tile=8)["grid"]
    fm.score_dataset(model, test.subset([0]), fm.ScoreConfig(K=1, T=1), torch.tensor(ckpt["mean"]),
                     torch.tensor(ckpt["std"]), "cpu", labels_for=1, tile=8, grid=2)
    # 3 x 3 tiles of 16^2 (stride 4): centres at 4, 8, 12 px lie in grid rows / columns 0, 1, 1
    assert sorted(torch.cat(seen).tolist()) == [4, 5, 5, 6, 6, 7, 7, 7, 7]  # category 1 x cells 0-3


def test_map_names_follow_the_official_layouts(tmp_path):
    assert fm.map_names("bottle", tmp_path / "bottle/test/broken_large/000.png") == \
        (fm.Path("bottle/test/broken_large/000.tiff"), None)
    tiff, png = fm.map_names("can", tmp_path / "can/test_public/bad/003_regular.png")
    assert tiff == fm.Path("anomaly_images/can/test_public/bad/003_regular.tiff")
    assert png == fm.Path("anomaly_images_thresholded/can/test_public/bad/003_regular.png")
    # a dot in the name stays: the evaluation looks for <image stem>.tiff, not a name cut at the dot
    assert fm.map_names("pill", tmp_path / "pill/test/crack/v1.2.png")[0] == fm.Path("pill/test/crack/v1.2.tiff")
    assert fm.map_names("can", tmp_path / "can/test_public/bad/a.b.png")[1].name == "a.b.png"


def test_written_maps_have_the_original_size_and_reopen_with_the_same_values(tmp_path):
    heat = np.random.default_rng(0).uniform(0, 5, (2, 8, 8)).astype(np.float32)
    names = [fm.map_names("can", tmp_path / f"can/test_public/bad/{i}.png") for i in range(2)]
    fm.write_maps(tmp_path / "maps", names, heat, [(20, 12), (8, 8)], threshold=2.5)
    for (tiff, png), h, (w, hh) in zip(names, heat, [(20, 12), (8, 8)]):
        back = np.asarray(Image.open(tmp_path / "maps" / tiff))
        assert back.shape == (hh, w) and back.dtype == np.float32
        want = torch.nn.functional.interpolate(torch.from_numpy(h)[None, None], size=(hh, w), mode="bilinear",
                                               align_corners=False)[0, 0].numpy()
        assert np.array_equal(back, want)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "maps" / png)), (want > 2.5).astype(np.uint8) * 255)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "maps" / names[1][0])), heat[1])  # at its size: as is


@pytest.fixture(scope="module")
def tiled_run(tmp_path_factory):
    """A tiny model trained on 8x8 tiles of 16x16 images for a few steps."""
    root = tmp_path_factory.mktemp("tiled")
    data = fm.make_demo_dataset(root / "data", size=16, n_train=6, n_test=2)
    r = run_cli("train", "--data", data, "--out", root / "run", "--preset", "tiny", "--steps", 3, "--batch-size", 4,
                "--tile", 8, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    return data, root / "run" / "ckpt.pt"


def test_tiled_training_and_test_write_maps_at_the_original_size(tiled_run, tmp_path):
    data, ckpt = tiled_run
    tc = torch.load(ckpt, weights_only=True)["train_config"]
    assert tc["tile"] == 8 and tc["tile_scale"] == 1.0
    r = run_cli("test", "--ckpt", ckpt, "--data", data, "--out", tmp_path / "e", "--save-maps", tmp_path / "maps",
                "-K", 2, "-T", 2, "--no-overlays", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    npz = np.load(tmp_path / "e" / "weave" / "heatmaps.npz")
    assert npz["heat"].shape == (4, 16, 16)  # stitched at the images' own size, not the tile's
    for path, h in zip(npz["paths"], npz["heat"]):
        p = fm.Path(path)
        back = np.asarray(Image.open(tmp_path / "maps" / "weave" / "test" / p.parent.name / (p.stem + ".tiff")))
        assert np.array_equal(back, h)


def test_resized_model_writes_maps_upsampled_to_the_original_size(trained, mvtec, tmp_path):
    """A whole-image checkpoint (16^2) on 32^2 images: TIFFs at 32^2."""
    big = fm.make_demo_dataset(tmp_path / "big", size=32, n_train=1, n_test=2)
    r = run_cli("test", "--ckpt", trained, "--data", big, "--out", tmp_path / "e", "--save-maps", tmp_path / "maps",
                "-K", 2, "-T", 2, "--no-overlays", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    maps = sorted((tmp_path / "maps").rglob("*.tiff"))
    assert len(maps) == 8 and all(Image.open(m).size == (32, 32) for m in maps)


def test_old_checkpoint_without_tile_fields_loads_with_the_defaults(trained, tmp_path):
    ckpt = torch.load(trained, weights_only=True)
    for f in fm.TRAIN_ADDED:
        ckpt["train_config"].pop(f)
    torch.save(ckpt, tmp_path / "old.pt")
    tc = fm.load_checkpoint(tmp_path / "old.pt")["train_config"]
    assert (tc["tile"], tc["tile_scale"]) == (0, 1.0)
    ckpt["train_config"]["other"] = 1  # anything else still refused
    torch.save(ckpt, tmp_path / "odd.pt")
    with pytest.raises(fm.UserError, match="other fields"):
        fm.load_checkpoint(tmp_path / "odd.pt")


def test_tiled_model_finds_small_defects_that_resizing_loses(tmp_path):
    """64^2 parts with 2-8 px defects (conftest.write_highres): resized to 16^2 a defect is under two
    pixels; the same model and steps on 16^2 tiles at native resolution localises them better
    (pixel AUROC at the original size; tests/bench_tiles.py is the full-size benchmark)."""
    from conftest import write_highres

    data = write_highres(tmp_path / "data", size=64, n_train=16, n_test=8)
    auroc = {}
    for name, flags in (("resize", ["--image-size", "16"]), ("tiles", ["--tile", "16"])):
        assert fm.main(list(map(str, ["train", "--data", data, "--out", tmp_path / name, *flags, "--preset", "tiny",
                                      "--steps", 80, "--batch-size", 8, "--calib-fraction", 0, "--device", "cpu"]))) == 0
        assert fm.main(list(map(str, ["test", "--ckpt", tmp_path / name / "ckpt.pt", "--data", data, "--out",
                                      tmp_path / f"e_{name}", "-K", 3, "-T", 3, "--eval-size", "original",
                                      "--no-overlays", "--device", "cpu"]))) == 0
        auroc[name] = json.loads((tmp_path / f"e_{name}" / "metrics.json").read_text())[fm.MEAN]["pixel_auroc"]
    assert auroc["tiles"] > 0.95 and auroc["tiles"] > auroc["resize"] + 0.02, auroc


def test_normalisation_over_images_of_different_sizes():
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randint(0, 255, shape, generator=g, dtype=torch.uint8) for shape in ((3, 8, 12), (3, 16, 8)))
    mean, std = fm.Dataset([a, b], torch.zeros(2, dtype=torch.long), ["c"], ["a", "b"]).normalisation()
    px = torch.cat([a.flatten(1), b.flatten(1)], 1).double() / 255  # every pixel once
    assert torch.allclose(mean.double(), px.mean(1), rtol=1e-6) and torch.allclose(std.double(), px.std(1), rtol=1e-6)


def test_explain_on_a_tiled_checkpoint_shows_the_tiled_map(tiled_run):
    """explain stitches every per-time map from the same tiles, so the mean over t is the scorer's map."""
    data, path = tiled_run
    detector = fm.load(path, "cpu")
    ckpt, model = detector.ckpt, detector.model
    test = fm.load_test(data, None, tile=8)["weave"].subset([3])
    mean, std = torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"])
    cfg = fm.ScoreConfig(K=2, T=3)
    heat, _ = fm.score_dataset(model, test, cfg, mean, std, "cpu", labels_for=1, tile=8)
    y = (test.images.float() / 255 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    e = fm.explain_maps(model, y, 1, cfg, tile=8)
    assert e["maps"].shape == (3, 16, 16) and torch.allclose(e["heat"], heat[0], rtol=1e-5, atol=1e-6)


def test_predict_on_a_tiled_checkpoint_scores_in_tiles(tiled_run):
    """fm.load(ckpt).predict: the tiled scorer's maps, at each image's original size."""
    data, path = tiled_run
    files = sorted((data / "weave" / "test" / "good").glob("*.png"))
    detector = fm.load(path, "cpu")
    pred = detector.predict([str(f) for f in files], category="weave", K=2, T=2)
    images = fm.uint8_batch([fm.read_image(f, None)[0] for f in files])
    heat, scores = fm.score_dataset(detector.model, dataset(images), fm.ScoreConfig(K=2, T=2), detector.mean,
                                    detector.std, "cpu", labels_for=1, tile=8)
    assert [m.shape for m in pred.anomaly_map] == [(16, 16)] * len(files)
    assert np.allclose(np.stack(pred.anomaly_map), heat.numpy(), rtol=1e-5, atol=1e-6)
    assert np.allclose(pred.pred_score, scores.numpy(), rtol=1e-5)


def test_test_and_predict_give_the_same_smoothed_map(tiled_run):
    """`test` (score_tests) and `score` / predict (Detector.stream) smooth the same map the same way."""
    data, path = tiled_run
    detector = fm.load(path, "cpu")
    tests = fm.load_test(data / "weave", None, tile=8)
    cfg = fm.ScoreConfig(K=2, T=2, smooth=1.0)
    heat, scores = fm.score_tests(detector, tests, cfg)["weave"]
    pred = detector.predict(tests["weave"].paths, category="weave", K=2, T=2, smooth=1.0)
    raw = detector.predict(tests["weave"].paths, category="weave", K=2, T=2)
    assert np.allclose(np.stack(pred.anomaly_map), heat, rtol=1e-5, atol=1e-7)
    assert np.allclose(pred.pred_score, scores, rtol=1e-5) and not np.allclose(pred.pred_score, raw.pred_score, rtol=1e-3)


def test_score_writes_maps_at_each_input_size(trained, tmp_path):
    """A 16^2 checkpoint scoring 32^2 images: maps/<folder>/<file>.tiff at 32^2."""
    big = fm.make_demo_dataset(tmp_path / "big", size=32, n_train=1, n_test=2)
    r = run_cli("score", "--ckpt", trained, big / "weave" / "test" / "good", "--out", tmp_path / "s", "-K", 2, "-T", 2,
                "--category", "weave", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    maps = sorted((tmp_path / "s" / "maps").rglob("*.tiff"))
    assert [m.name for m in maps] == ["000.png.tiff", "001.png.tiff"]
    assert all(Image.open(m).size == (32, 32) and Image.open(m).mode == "F" for m in maps)


def test_image_size_given_with_tile_is_refused_not_ignored(mvtec, tmp_path):
    r = run_cli("train", "--data", mvtec, "--out", tmp_path / "run", "--preset", "tiny", "--tile", 8,
                "--image-size", 16, "--steps", 1, "--device", "cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--image-size" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
