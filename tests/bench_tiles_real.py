"""Resize against tiles on real photographs: 128^2 crops at native resolution of the two photos that
ship with scikit-learn (china.jpg, flower.jpg, 427 x 640), one category each. Training crops come
from the left 70 % of a photo, test crops from the right 30 %, so every test image shows a part of
the scene the model never saw. Per photo: 60 training crops, 4 normal test crops and 2 each with
a thin scratch (1-2 px wide, 10-30 px long), a blob (2-8 px across) or a faint stain (12-28 px
across, a quarter of the way to another colour), with their masks, in MVTec layout.

    OMP_NUM_THREADS=1 nice -n 19 python tests/bench_tiles_real.py --out /tmp/bench_real   # ~1 h on 2 busy cores

The same `tiny` model, batch 16, is trained on whole crops resized to 32^2 (`--image-size 32`) and on
random 32^2 tiles at native resolution (`--tile 32`); one run per model, tested after each step
count of the curve (a checkpoint of step s is exactly a run of s steps: batches and noise are drawn
from (seed, step)). Variants, each tested in the same run: the map smoothed before S and the metrics
(`--smooth SIGMA`, applied by smooth_maps exactly as the scorer applies it), the tiles' stride and a
flat blending window, more steps for tiles, tile size 64 and `--tile-scale 0.5`. Every test is at
K = T = 3 with pixel metrics at the original 128^2. Prints one table; writes OUT/bench_tiles_real.json.
Pixel AUROC per defect kind: that kind's defect pixels against all normal pixels. Maps are cached in
OUT/maps and runs in OUT/<model> (delete OUT to measure again)."""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import fm  # noqa: E402

CROP, SPLIT = 128, 0.7  # crop side; the share of a photo's width that training crops come from
KINDS = ("scratch", "blob", "stain")


def defect(img, kind, rng):
    """One defect of `kind` drawn into img (float (S, S, 3) in [0, 1]), away from the border; its mask."""
    S = img.shape[0]
    yy, xx = np.mgrid[0:S, 0:S]
    cy, cx = rng.uniform(16, S - 16, 2)
    if kind == "scratch":  # a line 1-2 px wide, 10-30 px long, darker or lighter
        a, half = rng.uniform(0, np.pi), rng.uniform(5, 15)
        along = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
        across = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
        mask = (np.abs(along) <= half) & (np.abs(across) <= rng.uniform(0.5, 1.0))
        img[mask] = img[mask] * 0.35 if rng.uniform() < 0.5 else 1 - (1 - img[mask]) * 0.35
    elif kind == "blob":  # 2-8 px across, of a random colour
        r = rng.uniform(1, 4)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
        img[mask] = rng.uniform(0, 1, 3)
    else:  # "stain": an ellipse 12-28 px across, 25 % of the way to a random colour
        ry, rx = rng.uniform(6, 14, 2)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        img[mask] = 0.75 * img[mask] + 0.25 * rng.uniform(0, 1, 3)
    return img, mask


def write_photos(root: Path, n_train=60, n_good=4, n_defect=2, seed=0) -> Path:
    """The data set described above, in MVTec layout: per photo n_train training crops, n_good
    normal test crops and n_defect of each defect kind."""
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)

    def write(path, arr):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8)).save(path)

    for name in ("china", "flower"):
        photo = load_sample_image(f"{name}.jpg").astype(float) / 255
        H, W = photo.shape[:2]
        cut = int(SPLIT * W)

        def crop(lo, hi):  # a CROP x CROP crop whose columns lie in [lo, hi)
            top, left = rng.integers(0, H - CROP + 1), rng.integers(lo, hi - CROP + 1)
            return photo[top:top + CROP, left:left + CROP].copy()

        for i in range(n_train):
            write(root / name / "train" / "good" / f"{i:03d}.png", crop(0, cut))
        for i in range(n_good):
            write(root / name / "test" / "good" / f"{i:03d}.png", crop(cut, W))
        for kind in KINDS:
            for i in range(n_defect):
                img, mask = defect(crop(cut, W), kind, rng)
                write(root / name / "test" / kind / f"{i:03d}.png", img)
                write(root / name / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(float))
    return root


COLUMNS = ("image_auroc", "pixel_auroc", "pixel_aupro", *(f"pixel_auroc_{k}" for k in KINDS))


def flat_window(N):
    return torch.ones(N, N)


def score_test_split(ckpt: Path, data: Path, K: int, T: int, **overrides) -> dict:
    """Heatmaps (unsmoothed) and timing of one checkpoint's test split, as `test` scores it."""
    detector = fm.load(ckpt, "cpu")
    tests = fm.load_test(data, *detector.geometry)
    t0 = time.time()
    scored = fm.score_tests(detector, tests, fm.ScoreConfig(K=K, T=T, **overrides))
    seconds = time.time() - t0
    return dict(scored=scored, seconds=seconds, images=sum(len(d) for d in tests.values()))


def metrics(data: Path, geometry, scored: dict, sigma: float) -> dict:
    """The mean over categories of the metrics at the original size after smoothing by sigma map pixels,
    with S (Eq. 4) recomputed on the smoothed maps, as the scorer computes both with --smooth sigma;
    and pixel AUROC per defect kind: the pixels of that kind's defects against every normal pixel."""
    from sklearn.metrics import roc_auc_score

    tests = fm.load_test(data, *geometry)
    smoothed, kinds = {}, {k: [] for k in KINDS}
    for name, (heat, _) in scored.items():
        h = fm.smooth_maps(torch.from_numpy(heat), sigma)
        smoothed[name] = h.numpy(), torch.cat([fm.image_score(m[None]) for m in h]).numpy()
        masks, up = fm.at_eval_size(tests[name], smoothed[name][0], "original")
        normal = np.concatenate([u[m == 0] for u, m in zip(up, masks)])
        for kind in KINDS:
            pos = np.concatenate([u[m > 0] for u, m, p in zip(up, masks, tests[name].paths)
                                  if Path(p).parent.name == kind])
            kinds[kind].append(roc_auc_score(np.r_[np.zeros(normal.size), np.ones(pos.size)], np.r_[normal, pos]))
    return {**fm.metrics_of(tests, smoothed, "original")["mean"],
            **{f"pixel_auroc_{k}": float(np.mean(v)) for k, v in kinds.items()}}


def counts(text):
    return [int(s) for s in text.split(",") if s]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_tiles_real")
    ap.add_argument("--steps", default="200,800", help="the curve: step counts of both models")
    ap.add_argument("--tile-steps", default="1600", help="further step counts of the tile model alone")
    ap.add_argument("--variants-at", type=int, default=800, help="steps at which stride and window are varied")
    ap.add_argument("--scaled-at", default="200,800", help="step counts of the --tile-scale 0.5 model")
    ap.add_argument("--large-at", default="200,800", help="step counts of the tile-64 model")
    ap.add_argument("--sigmas", default="0,1,2", help="--smooth values (map pixels)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("-K", type=int, default=3)
    ap.add_argument("-T", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated model names to run (default all)")
    args = ap.parse_args()
    out, steps = Path(args.out), counts(args.steps)
    tile_steps = steps + counts(args.tile_steps)
    sigmas = [float(s) for s in args.sigmas.split(",")]
    data = out / "data"
    if not data.exists():
        write_photos(data)
    # name: (train flags, step counts, {steps: [(test variant, ScoreConfig overrides, patched window)]})
    plain = [("", {}, None)]
    at = {args.variants_at: plain + [("stride 32", dict(stride=32), None), ("flat window", {}, flat_window)]}
    models = {"resize": (["--image-size", 32], steps, {}),
              "tiles": (["--tile", 32], tile_steps, at),
              "tiles_scale0.5": (["--tile", 32, "--tile-scale", 0.5], counts(args.scaled_at), {}),
              "tiles64": (["--tile", 64], counts(args.large_at), {})}
    only = set(args.only.split(",")) - {""}
    common = ["--preset", "tiny", "--batch-size", args.batch_size, "--calib-fraction", 0, "--device", "cpu",
              "--save-every", 10**6]
    (out / "maps").mkdir(parents=True, exist_ok=True)
    rows, norms = [], {}
    for name, (flags, stages, variants) in models.items():
        if only and name not in only:
            continue
        run, train_s = out / name, 0.0
        for s in stages:
            for variant, overrides, window in variants.get(s, plain):
                cache = out / "maps" / f"{name}_{s}{'_' + variant.replace(' ', '') if variant else ''}.npz"
                if not cache.exists():
                    step = fm.load_checkpoint(run / "ckpt.pt")["step"] if (run / "ckpt.pt").exists() else 0
                    if step > s:
                        raise SystemExit(f"{run}: at step {step}, past {s}; delete it to measure again")
                    if step < s:
                        t0 = time.time()
                        cmd = ["train", "--resume", run] if step else ["train", "--data", data, "--out", run, *flags]
                        assert fm.main(list(map(str, [*cmd, *common, "--steps", s]))) == 0
                        train_s += time.time() - t0
                    old, fm.tile_window = fm.tile_window, window or fm.tile_window
                    try:
                        r = score_test_split(run / "ckpt.pt", data, args.K, args.T, **overrides)
                    finally:
                        fm.tile_window = old
                    np.savez(cache, seconds=r["seconds"], images=r["images"], train_s=train_s,
                             **{f"{c}_{k}": v for c, (h, sc) in r["scored"].items()
                                for k, v in (("heat", h), ("scores", sc))})
                z = np.load(cache)
                scored = {c: (z[f"{c}_heat"], z[f"{c}_scores"]) for c in ("china", "flower")}
                ckpt = fm.load_checkpoint(run / "ckpt.pt")
                geometry = fm.image_geometry(ckpt["train_config"])
                norms[name] = dict(mean=ckpt["mean"], std=ckpt["std"])
                for sigma in sigmas:
                    m = metrics(data, geometry, scored, sigma)
                    scale = CROP / z["china_heat"].shape[-1]  # image pixels per map pixel
                    rows.append(dict(model=name, flags=" ".join(map(str, flags)), steps=s, variant=variant,
                                     sigma=sigma, sigma_image_px=sigma * scale, train_s=float(z["train_s"]),
                                     test_s_per_image=float(z["seconds"] / z["images"]),
                                     **{k: m[k] for k in COLUMNS}))
                    print(json.dumps(rows[-1]), flush=True)
    print(f"\n128^2 crops of china.jpg and flower.jpg (train: left {SPLIT:.0%}, test: the rest), thin scratches, "
          f"2-8 px blobs, faint stains; tiny, batch {args.batch_size}; K={args.K} T={args.T}; pixel metrics at 128^2; mean of "
          f"the 2 categories, in %; sigma of --smooth in map pixels (image pixels)")
    print("| model | steps | test variant | --smooth | image AUROC | pixel AUROC | AUPRO | pixel AUROC "
          + " | ".join(KINDS) + " | test s/image |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} (`{r['flags']}`) | {r['steps']} | {r['variant'] or '-'} | {r['sigma']:g} "
              f"({r['sigma_image_px']:g}) | " + " | ".join(fm.percent(r[k]) for k in COLUMNS)
              + f" | {r['test_s_per_image']:.3f} |")
    print("normalisation (mean, std per channel):", json.dumps(norms))
    (out / "bench_tiles_real.json").write_text(json.dumps(dict(vars(args), rows=rows, norms=norms), indent=2))


if __name__ == "__main__":
    main()
