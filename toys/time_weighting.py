"""Fig. 6 (App. B.2): per-time mismatch maps of the half-moon flow and their t^2-weighted aggregate.

For each grid point y and each interior time t_j = j / (T + 1), delta_t is the min over K
paths of |v(x_t, t) - (y - x0)|^2 (Eq. 3); the aggregate is mean_j t_j^2 delta_{t_j} (Eq. 4),
which equals the core's mismatch_heat (checked below and in test_toys.py).

    python toys/time_weighting.py    # ~30 s on a laptop CPU -> toys/out/fig6_time_weighting.png
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.stats import spearmanr

import toy_flow as tf
from flow_mismatch import WEIGHTS, ScoreConfig

SHOWN = (1, 3, 5, 7, 10)  # j of the per-time panels, t = j / 11


def times(T: int) -> list:
    return [j / (T + 1) for j in range(1, T + 1)]


def per_time_maps(model, pts, cfg=ScoreConfig()) -> np.ndarray:
    """(T, n): delta_t over the points at every interior time of cfg."""
    return np.stack([tf.mismatch_at(model, pts, t, cfg).numpy() for t in times(cfg.T)])


def weighted(deltas: np.ndarray) -> np.ndarray:
    """Eq. (4): H = mean_j t_j^2 delta_{t_j}, from the (T, n) per-time maps."""
    t = np.array(times(len(deltas)))
    return (t[:, None] ** 2 * deltas).mean(0)


def data_mean() -> np.ndarray:
    return tf.sample_half_moon(100_000, torch.Generator().manual_seed(1)).mean(0).numpy()


def time_profile(model, pts, cfg=ScoreConfig(), seeds=range(1, 6)) -> dict:
    """Per time t_j: localisation (ROC-AUC of "distance to arc > 1"), global bias (Spearman
    correlation with the distance to the data mean vs with the distance to the arc), and the
    spread across noise draws (per-pixel std of the normalised map over `seeds`); the same
    for the aggregate, under key "agg"."""
    d = tf.distance_to_arc(pts.numpy())
    dm = np.linalg.norm(pts.numpy() - data_mean(), axis=1)
    runs = [per_time_maps(model, pts, ScoreConfig(K=cfg.K, T=cfg.T, seed=s)) for s in seeds]  # each (T, n)
    maps = [list(r) + [weighted(r)] for r in runs]  # T per-time maps, then the aggregate
    out = {}
    for i, key in enumerate(times(cfg.T) + ["agg"]):
        h = maps[0][i]
        out[key] = dict(auc=tf.roc_auc(d > 1, h), rho_arc=spearmanr(h, d)[0], rho_mean=spearmanr(h, dm)[0],
                        spread=float(np.std([tf.normalise(m[i]) for m in maps], axis=0).mean()))
    return out


def plot(deltas, agg, profile, X1, X2, path):
    plt = tf.setup_matplotlib()
    from matplotlib.colors import PowerNorm

    T = len(deltas)
    fig = plt.figure(figsize=(16, 6.8), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1.25, 1])
    axes = top.subplots(1, len(SHOWN) + 1, sharey=True)
    arc = tf.arc_points()
    panels = [(deltas[j - 1], f"$\\delta_t$, t = {j}/{T + 1} = {j / (T + 1):.2f}") for j in SHOWN]
    panels.append((agg, "aggregate $\\frac{1}{T}\\sum_t t^2 \\delta_t$"))
    for ax, (h, title) in zip(axes, panels):
        ax.pcolormesh(X1, X2, tf.normalise(h).reshape(X1.shape), cmap="viridis", norm=PowerNorm(0.5, 0, 1),
                      shading="auto")
        ax.plot(arc[:, 0], arc[:, 1], color="w", lw=0.8, ls="--")
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
        ax.set_xlabel("$x_1$")
    axes[0].set_ylabel("$x_2$")
    top.suptitle("Fig. 6: per-time mismatch maps (min over K = 10 paths, normalised, sqrt colour scale) "
                 "and the $t^2$-weighted aggregate")
    t = np.array(times(T))
    a1, a2, a3 = bottom.subplots(1, 3)
    a1.plot(t, [profile[s]["auc"] for s in t], "o-", label="per-time $\\delta_t$")
    a1.axhline(profile["agg"]["auc"], color="k", ls="--", label="aggregate")
    a1.set(xlabel="t", ylabel="ROC-AUC (distance > 1)", title="localisation")
    a2.plot(t, [profile[s]["rho_mean"] for s in t], "o-", label="vs distance to data mean")
    a2.plot(t, [profile[s]["rho_arc"] for s in t], "s-", label="vs distance to arc")
    a2.set(xlabel="t", ylabel="Spearman correlation", title="global bias vs geometry")
    a3.plot(t, [profile[s]["spread"] for s in t], "o-", label="per-time $\\delta_t$")
    a3.axhline(profile["agg"]["spread"], color="k", ls="--", label="aggregate")
    a3.set(xlabel="t", ylabel="per-pixel std over 5 seeds", title="variability across noise draws")
    share = t**2 * deltas.mean(1)
    a1b = a1.twinx()
    a1b.bar(t, share / share.sum(), width=0.04, alpha=0.2, color="C3")
    a1b.set_ylabel("share of the aggregate ($t^2\\bar\\delta_t$)", color="C3")
    for ax in (a1, a2, a3):
        ax.legend(fontsize=8, loc="lower left" if ax is not a3 else "upper center")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    args = tf.parse_args(__doc__)
    torch.set_num_threads(1)
    t0 = time.time()
    model = tf.train_flow(tf.sample_half_moon, steps=args.steps, seed=args.seed)
    print(f"trained the MLP flow in {time.time() - t0:.1f} s")
    pts, X1, X2 = tf.grid(args.grid)
    cfg = ScoreConfig(seed=args.seed)
    deltas = per_time_maps(model, pts, cfg)
    agg = weighted(deltas)
    core = tf.score(model, pts, cfg).numpy()
    print(f"aggregate vs core mismatch_heat: max |difference| {np.abs(agg - core).max():.2e} (max H {core.max():.1f})")
    coarse, _, _ = tf.grid(max(10, args.grid // 2))
    profile = time_profile(model, coarse, cfg)
    share = np.array(times(cfg.T)) ** 2 * deltas.mean(1)
    print(f"{'t':>6} {'AUC(d>1)':>8} {'rho(arc)':>8} {'rho(mean)':>9} {'seed std':>8} {'share':>6}")
    for i, t in enumerate(times(cfg.T) + ["agg"]):
        p = profile[t]
        label = f"{t:6.3f}" if t != "agg" else "   agg"
        sh = f"{share[i] / share.sum():6.3f}" if t != "agg" else ""
        print(f"{label} {p['auc']:8.3f} {p['rho_arc']:8.3f} {p['rho_mean']:9.3f} {p['spread']:8.4f} {sh}")
    print(f"rho: Spearman correlation of the map with the distance to the arc / to the data mean; seed std over "
          f"seeds 1-5 on {len(coarse)} points; share: fraction of the aggregate from each time")
    d = tf.distance_to_arc(coarse.numpy())
    print("time weight w(t) of Eq. (4), mean over seeds 1-5:")
    for w in WEIGHTS:
        hs = [tf.score(model, coarse, ScoreConfig(weight=w, seed=s)).numpy() for s in range(1, 6)]
        print(f"  w = {w:>3}: AUC(d>1) {np.mean([tf.roc_auc(d > 1, h) for h in hs]):.4f}, far/near "
              f"{np.mean([h[d > 2].mean() / h[d < 0.3].mean() for h in hs]):6.1f}, seed std "
              f"{np.std([tf.normalise(h) for h in hs], axis=0).mean():.4f}")
    path = args.out / "fig6_time_weighting.png"
    plot(deltas, agg, profile, X1, X2, path)
    print(f"wrote {path} ({time.time() - t0:.1f} s in all)")


if __name__ == "__main__":
    main()
