"""Datasets as users download them: every mask encoding and every benchmark layout, generated
tiny here, must give the same seven metrics on the same heatmaps; honest tables (null, n/a,
counted means); --eval-size and --image-score; progress lines."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import flow_mismatch as fm

SIZE = 32  # stored size of the generated images; they are loaded at 16


def make_images(seed=0, n_train=4, n_good=3, n_bad=3):
    """(train, good, bad, masks): uint8 RGB arrays, bad images bright inside their bool masks."""
    rng = np.random.default_rng(seed)

    def image():
        return (rng.uniform(0.2, 0.6, (SIZE, SIZE, 3)) * 255).astype(np.uint8)

    train, good, bad, masks = [image() for _ in range(n_train)], [image() for _ in range(n_good)], [], []
    for i in range(n_bad):
        mask = np.zeros((SIZE, SIZE), bool)
        mask[4 + 3 * i:12 + 3 * i, 6:14 + 2 * i] = True
        mask[22:26, 20 + i:28] = True  # a second region
        img = image()
        img[mask] = 245 - 10 * i
        bad.append(img)
        masks.append(mask)
    return train, good, bad, masks


IMAGES = make_images()


def encode(mask, encoding):
    """A bool mask stored the way some dataset or tool stores it."""
    if encoding == "0/255":
        return Image.fromarray(mask.astype(np.uint8) * 255)
    if encoding == "0/1":
        return Image.fromarray(mask.astype(np.uint8))
    if encoding == "label map":  # class id 3, as raw VisA stores defect classes
        return Image.fromarray(mask.astype(np.uint8) * 3)
    if encoding == "palette":  # index 1 is a dark red: grey value 30
        im = Image.fromarray(mask.astype(np.uint8), "P")
        im.putpalette([0, 0, 0, 100, 0, 0])
        return im
    if encoding == "16-bit":
        return Image.fromarray(mask.astype(np.uint16) * 100)
    if encoding == "RGB":  # red: grey value 60
        return Image.fromarray(mask[..., None] * np.array([200, 0, 0], np.uint8))
    if encoding == "RGBA":  # blue on black, opaque everywhere: the alpha is not the mask
        rgba = np.zeros((*mask.shape, 4), np.uint8)
        rgba[..., 2], rgba[..., 3] = mask * 255, 255
        return Image.fromarray(rgba)
    if encoding == "bilevel":
        return Image.fromarray(mask).convert("1")
    raise ValueError(encoding)


ENCODINGS = ("0/255", "0/1", "label map", "palette", "16-bit", "RGB", "RGBA", "bilevel")


def save(path, arr_or_image):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = arr_or_image if isinstance(arr_or_image, Image.Image) else Image.fromarray(arr_or_image)
    im.save(path)


def write_mvtec(cat, encoding="0/255", images=IMAGES, ext=".png", suffix="_mask", gt=True):
    train, good, bad, masks = images
    for i, img in enumerate(train):
        save(cat / "train" / "good" / f"{i:03d}{ext}", img)
    for i, img in enumerate(good):
        save(cat / "test" / "good" / f"{i:03d}{ext}", img)
    for i, (img, mask) in enumerate(zip(bad, masks)):
        save(cat / "test" / "crack" / f"{i:03d}{ext}", img)
        if gt:
            save(cat / "ground_truth" / "crack" / f"{i:03d}{suffix}{ext}", encode(mask, encoding))
    return cat


def write_visa_1cls(cat):
    train, good, bad, masks = IMAGES
    for sub, imgs in (("train/good", train), ("test/good", good), ("test/bad", bad)):
        for i, img in enumerate(imgs):
            save(cat / sub / f"{i:04d}.png", img)
    for i, mask in enumerate(masks):
        save(cat / "ground_truth" / "bad" / f"{i:04d}.png", encode(mask, "0/255"))
    return cat


def write_raw_visa(root, name):
    """The VisA download: split_csv/1cls.csv; images under <object>/Data/Images/{Normal,Anomaly},
    label-map masks under <object>/Data/Masks/Anomaly."""
    train, good, bad, masks = IMAGES
    rows = []
    for i, img in enumerate(train + good):
        rel = f"{name}/Data/Images/Normal/{i:04d}.png"
        save(root / rel, img)
        rows.append([name, "train" if i < len(train) else "test", "normal", rel, ""])
    for i, (img, mask) in enumerate(zip(bad, masks)):
        rel, mrel = f"{name}/Data/Images/Anomaly/{i:03d}.png", f"{name}/Data/Masks/Anomaly/{i:03d}.png"
        save(root / rel, img)
        save(root / mrel, encode(mask, "label map"))
        rows.append([name, "test", "anomaly", rel, mrel])
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows([["object", "split", "label", "image", "mask"], *rows])
    return root / name


def write_ad2(cat):
    """MVTec AD 2: test_public with its own ground_truth; validation and test_private are not test data."""
    train, good, bad, masks = IMAGES
    for sub, imgs in (("train/good", train), ("test_public/good", good), ("test_public/bad", bad),
                      ("validation/good", good[:1]), ("test_private", bad[:1])):
        for i, img in enumerate(imgs):
            save(cat / sub / f"{i:03d}_regular.png", img)
    for i, mask in enumerate(masks):
        save(cat / "test_public" / "ground_truth" / "bad" / f"{i:03d}_regular_mask.png", encode(mask, "0/255"))
    return cat


def write_btad(cat):
    """BTAD: ok / ko folders, BMP masks named like the image."""
    train, good, bad, masks = IMAGES
    for sub, imgs in (("train/ok", train), ("test/ok", good), ("test/ko", bad)):
        for i, img in enumerate(imgs):
            save(cat / sub / f"{i:04d}.bmp", img)
    for i, mask in enumerate(masks):
        save(cat / "ground_truth" / "ko" / f"{i:04d}.bmp", encode(mask, "0/255"))
    return cat


def write_loco(cat):
    """MVTec LOCO: a folder of masks per defect image; here each region in its own file."""
    train, good, bad, masks = IMAGES
    for sub, imgs in (("train/good", train), ("validation/good", good[:1]), ("test/good", good),
                      ("test/structural_anomalies", bad)):
        for i, img in enumerate(imgs):
            save(cat / sub / f"{i:03d}.png", img)
    for i, mask in enumerate(masks):
        top, bottom = mask.copy(), mask.copy()
        top[16:], bottom[:16] = False, False
        save(cat / "ground_truth" / "structural_anomalies" / f"{i:03d}" / "000.png", encode(top, "0/255"))
        save(cat / "ground_truth" / "structural_anomalies" / f"{i:03d}" / "001.png", encode(bottom, "0/255"))
    return cat


LAYOUTS = {"mvtec": lambda root: write_mvtec(root / "part"), "visa_1cls": lambda root: write_visa_1cls(root / "part"),
           "raw_visa": lambda root: write_raw_visa(root, "part").parent, "ad2": lambda root: write_ad2(root / "part"),
           "btad": lambda root: write_btad(root / "part"), "loco": lambda root: write_loco(root / "part")}


def fixed_heat(data):
    """Heatmaps that depend on each image's pixels only, so any order of the images gives the same metrics."""
    heat = data.images.float().mean(1).numpy() / 255
    return heat, fm.image_score(torch.from_numpy(heat)).numpy()


def metrics(tests, eval_size=None):
    return fm.metrics_of(tests, {name: fixed_heat(d) for name, d in tests.items()}, eval_size)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Metrics of MVTec-AD layout with 0/255 masks: what every other encoding and layout must give."""
    root = write_mvtec(tmp_path_factory.mktemp("ref") / "part")
    tests = fm.load_test(root, 16)
    return tests["part"], metrics(tests)["part"]


def test_reference_has_every_metric(reference):
    _, m = reference
    assert all(m[k] is not None and 0.5 < m[k] <= 1 for k in fm.METRICS), m


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_mask_encoding_gives_the_same_metrics(encoding, reference, tmp_path):
    data, ref = reference
    tests = fm.load_test(write_mvtec(tmp_path / "part", encoding), 16)
    assert np.array_equal(tests["part"].masks, data.masks)
    assert metrics(tests)["part"] == ref


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_the_same_metrics(layout, reference, tmp_path):
    data, ref = reference
    root = LAYOUTS[layout](tmp_path / "root")
    train = fm.load_train(root, 16)
    assert train.class_names == ["part"] and len(train) == 4
    tests = fm.load_test(root, 16)
    assert list(tests) == ["part"] and len(tests["part"]) == 6 and tests["part"].anomalous.sum() == 3
    assert tests["part"].masks.sum() == data.masks.sum() > 0
    assert metrics(tests)["part"] == ref


def test_hidden_entries_and_case_are_ignored(reference, tmp_path):
    """Upper-case extensions, _MASK suffix; dot-files, AppleDouble ._ files, __MACOSX and
    .ipynb_checkpoints anywhere are not data."""
    _, ref = reference
    cat = write_mvtec(tmp_path / "root" / "part", ext=".PNG", suffix="_MASK")
    for folder in (cat / "train" / "good", cat / "test" / "crack", cat / "ground_truth" / "crack", tmp_path / "root"):
        (folder / ".DS_Store").write_bytes(b"\0junk")
        (folder / "._000.png").write_bytes(b"\0junk")
    (cat / "test" / ".ipynb_checkpoints").mkdir()
    (cat / "test" / ".ipynb_checkpoints" / "000.png").write_bytes(b"\0junk")
    write_mvtec(tmp_path / "root" / "__MACOSX" / "part")
    (tmp_path / "root" / "__MACOSX" / "part" / "train" / "good" / "000.PNG").write_bytes(b"\0junk")
    assert fm.load_train(tmp_path / "root", 16).class_names == ["part"]
    tests = fm.load_test(tmp_path / "root", 16)
    assert list(tests) == ["part"] and len(tests["part"]) == 6
    assert metrics(tests)["part"] == ref


def test_a_root_may_mix_layouts(tmp_path):
    root = tmp_path / "mixed"
    write_raw_visa(root, "candle")
    write_btad(root / "01")
    write_loco(root / "juice_bottle")
    write_mvtec(root / "own", gt=False)
    assert fm.load_train(root, 16).class_names == ["01", "candle", "juice_bottle", "own"]
    tests = fm.load_test(root, 16)
    assert [tests[n].mask_files is None for n in tests] == [False, False, False, True]
    assert all(tests[n].masks.sum() > 0 for n in ("01", "candle", "juice_bottle"))


@pytest.mark.parametrize("layout, recogniser", [("mvtec", "mvtec"), ("visa_1cls", "mvtec"), ("ad2", "mvtec_ad2"),
                                                  ("btad", "btad"), ("loco", "mvtec")])
def test_each_layout_is_read_by_its_own_recogniser(layout, recogniser, tmp_path):
    """LAYOUTS is tried in order: the first recogniser that accepts the folder is the one of its row
    (raw VisA is told by its split_csv at the root instead)."""
    cat = LAYOUTS[layout](tmp_path / "root")
    first = next(r for r in fm.LAYOUTS if r(cat))
    assert first.__name__ == recogniser
    train_dir, test_dir = first(cat)
    assert fm.folder_category(cat).train == fm.image_files(train_dir) and len(fm.image_files(train_dir)) == 4


def test_a_new_layout_is_one_recogniser(reference, tmp_path, monkeypatch):
    """A layout none of LAYOUTS knows (normal/, evaluation/) is read once one recogniser names its folders."""
    _, ref = reference
    cat = write_mvtec(tmp_path / "part")
    (cat / "train" / "good").rename(cat / "normal")
    (cat / "train").rmdir()
    (cat / "test").rename(cat / "evaluation")
    with pytest.raises(fm.UserError, match="holds no category"):
        fm.load_train(cat, 16)

    def normal_evaluation(c):
        return (c / "normal", c / "evaluation") if (c / "evaluation").is_dir() else None

    monkeypatch.setattr(fm, "LAYOUTS", [normal_evaluation, *fm.LAYOUTS])
    assert len(fm.load_train(cat, 16)) == 4
    assert metrics(fm.load_test(cat, 16))["part"] == ref


def test_raw_visa_object_folder_alone_reads_the_split_of_its_parent(tmp_path):
    write_raw_visa(tmp_path / "visa", "candle")
    tests = fm.load_test(tmp_path / "visa" / "candle", 16)
    assert list(tests) == ["candle"] and tests["candle"].anomalous.tolist() == [1, 1, 1, 0, 0, 0]


def test_empty_mask_of_a_defect_image_is_a_warning_naming_it(tmp_path, capsys):
    train, good, bad, masks = IMAGES
    cat = write_mvtec(tmp_path / "part", images=(train, good, bad, [masks[0], np.zeros_like(masks[1]), masks[2]]))
    tests = fm.load_test(cat, 16)
    err = capsys.readouterr().err
    assert "001_mask.png" in err and "crack/001.png" in err and "empty" in err
    assert len(err.strip().splitlines()) == 1 and tests["part"].masks[4].sum() == 0


def test_folder_without_masks_gives_image_metrics_and_null_pixel_metrics(reference, tmp_path, capsys):
    _, ref = reference
    tests = fm.load_test(write_mvtec(tmp_path / "part", gt=False), 16)
    assert "no ground_truth" in capsys.readouterr().err
    m = metrics(tests)["part"]
    assert {k: m[k] for k in fm.METRICS[:3]} == {k: ref[k] for k in fm.METRICS[:3]}
    assert all(m[k] is None for k in fm.METRICS[3:])


def test_mean_row_says_over_how_many_categories():
    full, none = dict.fromkeys(fm.METRICS, 0.5), dict.fromkeys(fm.METRICS)
    image_only = {**full, **dict.fromkeys(fm.METRICS[3:])}
    # every metric over 1 of 2 categories: the row label counts
    table = fm.format_table({"a": full, "b": none, fm.MEAN: full}).splitlines()
    assert table[3] == "| b | " + " | ".join(["n/a"] * 7) + " |"
    assert table[4].startswith("| mean (1/2) | 50.0 |")
    # pixel metrics over 1 of 2, image metrics over 2: each partial cell counts
    table = fm.format_table({"a": full, "b": image_only, fm.MEAN: full}).splitlines()
    assert table[4] == "| mean | " + " | ".join(["50.0"] * 3 + ["50.0 (1/2)"] * 4) + " |"
    # complete: a plain mean
    assert fm.format_table({"a": full, "b": full, fm.MEAN: full}).splitlines()[4].startswith("| mean | 50.0 |")


def test_eval_size_matches_a_direct_computation_at_that_size(tmp_path):
    """Heatmaps upsampled by Pillow's bilinear filter, masks read by Pillow at that size; one image
    of another size so that 'original' compares maps of different shapes."""
    train, good, bad, masks = IMAGES
    cat = write_mvtec(tmp_path / "part")
    big = np.kron(bad[0], np.ones((5, 5, 1), np.uint8))[:40, :40]
    save(cat / "test" / "crack" / "000.png", big)
    save(cat / "ground_truth" / "crack" / "000_mask.png", encode(np.kron(masks[0], np.ones((5, 5), bool))[:40, :40], "0/255"))
    tests = fm.load_test(cat, 16)
    data = tests["part"]
    heat, scores = fixed_heat(data)
    for size in (24, "original"):
        maps, gts = [], []
        for h, path, label in zip(heat, data.paths, data.anomalous):
            w, hh = Image.open(path).size if size == "original" else (size, size)
            maps.append(np.asarray(Image.fromarray(h, "F").resize((w, hh), Image.BILINEAR)))
            mask_path = cat / "ground_truth" / "crack" / (path.split("/")[-1][:-4] + "_mask.png")
            gts.append(np.asarray(Image.open(mask_path).resize((w, hh), Image.NEAREST)) > 0 if label
                       else np.zeros((hh, w), bool))
        direct = fm.compute_metrics(data.anomalous, scores, gts, maps)
        ours = metrics(tests, size)["part"]
        assert ours == pytest.approx(direct, abs=1e-4)
        assert ours["pixel_aupro"] != pytest.approx(metrics(tests)["part"]["pixel_aupro"], abs=1e-4)


def test_image_score_rule():
    heat = torch.rand(3, 10, 10)
    assert torch.equal(fm.image_score(heat, "max"), heat.flatten(1).amax(1))
    assert torch.all(fm.image_score(heat) > fm.image_score(heat, "max"))  # Eq. (4) adds the top-1 % mean


def test_eval_size_and_image_score_flags():
    args = fm.build_parser().parse_args(["test", "--ckpt", "c", "--data", "d", "--out", "o", "--eval-size", "original",
                                         "--image-score", "max"])
    assert args.eval_size == "original" and fm.ScoreConfig(**fm.given(fm.ScoreConfig, args)).image_score == "max"
    assert fm.build_parser().parse_args(["test", "--ckpt", "c", "--data", "d", "--out", "o", "--eval-size", "256"]
                                        ).eval_size == 256
    with pytest.raises(fm.UserError, match="--eval-size"):
        fm.build_parser().parse_args(["test", "--ckpt", "c", "--data", "d", "--out", "o", "--eval-size", "big"])
    with pytest.raises(fm.UserError, match="--image-score"):
        fm.ScoreConfig(image_score="mean")


def strict(text):
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def test_test_on_a_root_with_a_mask_free_category(trained, tmp_path, capsys):
    """grid with masks, weave without: strict JSON with null, n/a in the table, the counted mean,
    progress on stderr, the image score rule in scores.csv."""
    write_mvtec(tmp_path / "data" / "grid")
    write_mvtec(tmp_path / "data" / "weave", gt=False)
    cfg = fm.ScoreConfig(K=1, T=1, image_score="max")
    results = fm.evaluate(trained, tmp_path / "data", tmp_path / "ev", cfg, "cpu", overlays=False,
                          log=lambda *a: None)
    saved = strict((tmp_path / "ev" / "metrics.json").read_text())
    assert saved == results
    assert all(saved["weave"][k] is None for k in fm.METRICS[3:])
    assert all(isinstance(saved[n][k], float) for n in ("grid", fm.MEAN) for k in fm.METRICS)
    assert [saved[fm.MEAN][k] for k in fm.METRICS[3:]] == [saved["grid"][k] for k in fm.METRICS[3:]]
    assert saved[fm.MEAN]["image_auroc"] == pytest.approx((saved["grid"]["image_auroc"] + saved["weave"]["image_auroc"]) / 2)
    rows = (tmp_path / "ev" / "table.md").read_text().splitlines()
    assert rows[3].endswith("| n/a | n/a | n/a | n/a |") and rows[4].endswith(" (1/2) |")
    err = capsys.readouterr().err
    assert "weave: no ground_truth" in err and "images 12/12" in err and "img/s" in err and "eta" in err
    npz = np.load(tmp_path / "ev" / "grid" / "heatmaps.npz")
    assert np.allclose(npz["scores"], npz["heat"].reshape(6, -1).max(1))


def test_score_prints_progress(trained, tmp_path, capsys):
    folder = write_mvtec(tmp_path / "grid") / "test" / "crack"
    assert fm.main(["score", "--ckpt", str(trained), str(folder), "--category", "grid", "--out", str(tmp_path / "s"),
                    "-K", "1", "-T", "1", "--device", "cpu"]) == 0
    assert "images 3/3" in capsys.readouterr().err


def test_compare_says_when_our_mean_is_partial(tmp_path, capsys):
    m = dict.fromkeys(fm.METRICS, 0.9)
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"bottle": m, fm.MEAN: m}))
    assert fm.main(["compare", str(path), "--dataset", "mvtec"]) == 0
    out, err = capsys.readouterr()
    assert "| mean | ours (1/15) |" in out and "not like for like" in err
    everything = {name: m for name in fm.PAPER_CATEGORIES["mvtec"]}
    path.write_text(json.dumps({**everything, fm.MEAN: m}))
    assert fm.main(["compare", str(path), "--dataset", "mvtec"]) == 0
    out, err = capsys.readouterr()
    assert "| mean | ours |" in out and err == ""
    path.write_text(json.dumps({**everything, "bottle": {**m, "pixel_ap": None}, fm.MEAN: m}))
    assert fm.main(["compare", str(path), "--dataset", "mvtec"]) == 0
    assert "| mean | ours (14/15) |" in capsys.readouterr().out
