"""Resize against tiles on generated high-resolution data (tests/conftest.py: write_highres): the same
tiny model trained for the same steps either on whole images resized to a quarter or on random tiles
at native resolution, then tested with pixel metrics at each image's original size.

    python tests/bench_tiles.py --out bench_tiles            # minutes on two CPU cores

Prints pixel AUROC / AUPRO (and image AUROC) of both, and the images/s of both `test` commands
(loading and metrics included) measured in this one run, so their ratio holds even on a busy
machine. --grid G adds tiles told their cell in a G x G grid (position conditioning): `part` is an
aligned object, `fabric` a texture."""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import fm, write_highres  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_tiles")
    ap.add_argument("--size", type=int, default=192, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("-K", type=int, default=5)
    ap.add_argument("-T", type=int, default=5)
    ap.add_argument("--grid", type=int, default=0, help="also tiles with position conditioning (--tile-grid G)")
    args = ap.parse_args()
    out = Path(args.out)
    data = out / "data"
    if not data.exists():
        write_highres(data, size=args.size)
    side = args.size // 4
    common = ["--preset", "tiny", "--steps", args.steps, "--batch-size", args.batch_size, "--calib-fraction", 0,
              "--device", "cpu"]
    rows = {}
    models = [("resize", ["--image-size", side]), ("tiles", ["--tile", side])]
    if args.grid:
        models.append(("tiles_grid", ["--tile", side, "--tile-grid", args.grid]))
    for name, flags in models:
        run = out / name
        if not (run / "ckpt.pt").exists():
            t0 = time.time()
            assert fm.main(list(map(str, ["train", "--data", data, "--out", run, *flags, *common]))) == 0
            train_s = time.time() - t0
        else:
            train_s = None
        t0 = time.time()
        assert fm.main(["test", "--ckpt", str(run / "ckpt.pt"), "--data", str(data), "--out", str(out / f"eval_{name}"),
                        "-K", str(args.K), "-T", str(args.T), "--eval-size", "original", "--no-overlays",
                        "--device", "cpu"]) == 0
        seconds = time.time() - t0
        results = json.loads((out / f"eval_{name}" / "metrics.json").read_text())
        n = sum(1 for _ in data.glob("*/test/*/*.png"))
        rows[name] = dict(flags=" ".join(map(str, flags)), train_s=train_s, images_per_s=n / seconds,
                          **{c: {k: results[c][k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")}
                             for c in results})
    print(f"\n{args.size}^2 images, 2-8 px defects; tiny, {args.steps} steps of batch {args.batch_size}; "
          f"K={args.K} T={args.T}; pixel metrics at the original size; in %")
    print("| model | category | image_auroc | pixel_auroc | pixel_aupro | test images/s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        for c in ("fabric", "part", fm.MEAN):
            m = r[c]
            print(f"| {name} ({r['flags']}) | {c} | " + " | ".join(fm.percent(m[k]) for k in
                  ("image_auroc", "pixel_auroc", "pixel_aupro")) + f" | {r['images_per_s']:.2f} |")
    print(f"test speed (whole command) resize / tiles: {rows['resize']['images_per_s'] / rows['tiles']['images_per_s']:.1f}x")
    (out / "bench_tiles.json").write_text(json.dumps(dict(vars(args), rows=rows), indent=2))


if __name__ == "__main__":
    main()
