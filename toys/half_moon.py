"""Fig. 5 (App. B.1): half-moon score maps of Flow Mismatching under (T, K) in {1, 3, 10}^2.

Normal data: the upper semicircle, centre (0, 3), radius 5 (a band of radial std 0.1);
source N(0, I); a time-conditioned MLP flow (toy_flow.py). Each grid point y of
x1 in [-8, 8], x2 in [-3, 14] is scored by the core's mismatch_heat: min over K paths
(Eq. 3), then w(t) = t^2 over T interior times (Eq. 4).

    python toys/half_moon.py              # ~30 s on a laptop CPU -> toys/out/fig5_half_moon.png
    python toys/half_moon.py --grid 40    # coarser and faster
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

import toy_flow as tf
from flow_mismatch import ScoreConfig

SETTINGS = [(T, K) for T in (1, 3, 10) for K in (1, 3, 10)]  # Fig. 5 panels, rows T, columns K
NEAR, FAR, OFF = 0.3, 2.0, 1.0  # distances to the arc: "near", "far", and the anomaly label


def score_maps(model, pts, settings=SETTINGS, cfg=ScoreConfig()) -> dict:
    """{(T, K): H over the grid points (n,)} with min over paths and w(t) = t^2 (cfg's)."""
    return {(T, K): tf.score(model, pts, replace(cfg, T=T, K=K)).numpy() for T, K in settings}


def separation(h: np.ndarray, d: np.ndarray) -> dict:
    """Low near the arc, high far from it: mean H within NEAR of the arc and beyond FAR,
    their ratio, and the ROC-AUC of "distance > OFF" from H."""
    near, far = float(h[d < NEAR].mean()), float(h[d > FAR].mean())
    return dict(near=near, far=far, ratio=far / near, auc=tf.roc_auc(d > OFF, h))


def seed_spread(model, pts, cfg: ScoreConfig, seeds=range(1, 6)) -> float:
    """Mean over pixels of the std, across independent noise draws (cfg.seed), of the
    min-max normalised map: how much the displayed map changes from one draw to the next."""
    maps = [tf.normalise(tf.score(model, pts, replace(cfg, seed=s)).numpy()) for s in seeds]
    return float(np.std(maps, axis=0).mean())


def roughness(h: np.ndarray, n: int) -> float:
    """Mean |difference| between neighbouring pixels of the normalised n x n map."""
    u = tf.normalise(h).reshape(n, n)
    return float((np.abs(np.diff(u, axis=0)).mean() + np.abs(np.diff(u, axis=1)).mean()) / 2)


def plot(maps, X1, X2, path):
    plt = tf.setup_matplotlib()
    from matplotlib.colors import PowerNorm

    fig, axes = plt.subplots(3, 3, figsize=(10, 10), sharex=True, sharey=True, layout="constrained")
    arc = tf.arc_points()
    for ax, (T, K) in zip(axes.ravel(), SETTINGS):
        im = ax.pcolormesh(X1, X2, tf.normalise(maps[T, K]).reshape(X1.shape), cmap="viridis",
                           norm=PowerNorm(0.5, 0, 1), shading="auto")
        ax.plot(arc[:, 0], arc[:, 1], color="w", lw=0.8, ls="--")
        ax.set_title(f"T = {T}, K = {K}", fontsize=10)
        ax.set_aspect("equal")
    for ax in axes[-1]:
        ax.set_xlabel("$x_1$")
    for ax in axes[:, 0]:
        ax.set_ylabel("$x_2$")
    fig.colorbar(im, ax=axes, shrink=0.6, label="normalised score H (sqrt colour scale)")
    fig.suptitle("Fig. 5: half-moon score maps, min over K paths, $w(t)=t^2$ over T times (dashed: normal support)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    args = tf.parse_args(__doc__)
    torch.set_num_threads(1)  # a tiny MLP: one thread avoids oversubscription
    t0 = time.time()
    model = tf.train_flow(tf.sample_half_moon, steps=args.steps, seed=args.seed)
    print(f"trained the MLP flow in {time.time() - t0:.1f} s")
    pts, X1, X2 = tf.grid(args.grid)
    d = tf.distance_to_arc(pts.numpy())
    maps = score_maps(model, pts, cfg=ScoreConfig(seed=args.seed))
    coarse, _, _ = tf.grid(max(10, args.grid // 2))
    print(f"{'T':>3} {'K':>3} {'near':>7} {'far':>7} {'far/near':>8} {'AUC(d>1)':>8} "
          f"{'area H<0.5':>10} {'roughness':>9} {'seed std':>8}")
    for T, K in SETTINGS:
        s = separation(maps[T, K], d)
        print(f"{T:3d} {K:3d} {s['near']:7.3f} {s['far']:7.2f} {s['ratio']:8.1f} {s['auc']:8.3f} "
              f"{(maps[T, K] < 0.5).mean():10.3f} {roughness(maps[T, K], args.grid):9.4f} "
              f"{seed_spread(model, coarse, ScoreConfig(T=T, K=K)):8.4f}")
    print(f"near: mean H within {NEAR} of the arc; far: beyond {FAR}; area: grid fraction with H < 0.5; "
          f"seed std: per-pixel std of the normalised map over seeds 1-5 ({len(coarse)} points)")
    path = args.out / "fig5_half_moon.png"
    plot(maps, X1, X2, path)
    print(f"wrote {path} ({time.time() - t0:.1f} s in all)")


if __name__ == "__main__":
    main()
