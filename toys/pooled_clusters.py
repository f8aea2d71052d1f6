"""Fig. 7 (App. B.3): Flow Mismatching when the normal data pool three clusters.

One unconditional MLP flow is trained on three Gaussian clusters (centres (-4, 4), (4, 4),
(0, -4), std 0.3). Affine paths from x0 in {(0, 0), (-2, -4), (2, 0)} go to a normal target
(the centre (4, 4)) and to two anomalous targets: (6, -2), outside the pooled support, and
(0, 4), the midpoint between two clusters. Along each path we plot the raw mismatch
Z_t = |v(x_t, t) - (y - x0)|^2 (Eq. 3) and t^2 Z_t (Eq. 4's weight), and we score the
targets and held-out normal samples with the core scorer (K = 10, T = 10, min, t^2).

    python toys/pooled_clusters.py    # ~30 s on a laptop CPU -> toys/out/fig7_pooled_clusters.png
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

import toy_flow as tf
from flow_mismatch import ScoreConfig

SOURCES = ((0.0, 0.0), (-2.0, -4.0), (2.0, 0.0))  # x0 of App. B.3
TARGETS = {"normal": (4.0, 4.0), "outside": (6.0, -2.0), "between": (0.0, 4.0)}
COLOURS = {"normal": "tab:green", "outside": "tab:red", "between": "tab:orange"}
WINDOW = (-8.0, 8.0)


def along_paths(model, ts) -> dict:
    """{(target name, x0): raw Z_t at the times ts} for every target and source."""
    return {(name, x0): tf.path_mismatch(model, y, x0, ts) for name, y in TARGETS.items() for x0 in SOURCES}


@torch.no_grad()
def alignment(model, y, x0, t: float) -> float:
    """Cosine between the learned velocity v(x_t, t) and the path velocity y - x0."""
    y, x0 = torch.tensor(y), torch.tensor(x0)
    xt = ((1 - t) * x0 + t * y)[None]
    v = model(xt, torch.tensor([t]))[0]
    return float(torch.nn.functional.cosine_similarity(v, y - x0, dim=0))


def normal_points(n: int = 100, seed: int = 1) -> torch.Tensor:
    """The three cluster centres and n held-out normal samples, (3 + n, 2)."""
    return torch.cat([torch.tensor(tf.CLUSTERS), tf.sample_clusters(n, torch.Generator().manual_seed(seed))])


def target_scores(model, cfg=ScoreConfig()) -> dict:
    """Aggregated scores H (Eq. 4): {"normals": (103,), name: float for each target}; all
    points are scored in one call, so each gets its own noise stream."""
    normals = normal_points()
    h = tf.score(model, torch.cat([normals, torch.tensor(list(TARGETS.values()))]), cfg).numpy()
    out = {"normals": h[:len(normals)]}
    out.update({name: float(s) for name, s in zip(TARGETS, h[len(normals):])})
    return out


def off_support(model, n: int = 40, cfg=ScoreConfig()) -> dict:
    """Grid points farther than 2 from every centre against the normal samples: ROC-AUC and
    the fraction of them above the highest normal score."""
    pts, X1, X2 = tf.grid(n, WINDOW, WINDOW)
    dc = np.linalg.norm(pts.numpy()[:, None] - np.array(tf.CLUSTERS)[None], axis=2).min(1)
    normals = normal_points()
    h = tf.score(model, torch.cat([normals, pts]), cfg).numpy()
    hn, hg = h[:len(normals)], h[len(normals):]
    off = hg[dc > 2]
    labels = np.r_[np.zeros(len(hn)), np.ones(len(off))]
    return dict(auc=tf.roc_auc(labels, np.r_[hn, off]), above=float((off > hn.max()).mean()), map=hg, X1=X1, X2=X2)


def plot(model, ts, paths, maps, path):
    plt = tf.setup_matplotlib()
    fig, axes = plt.subplots(2, 3, figsize=(16, 10), layout="constrained")
    ax = axes[0, 0]
    pts = tf.sample_clusters(600, torch.Generator().manual_seed(2))
    ax.scatter(*pts.T, s=3, color="tab:blue", alpha=0.4, label="normal data (3 clusters)")
    starts = torch.randn(60, 2, generator=torch.Generator().manual_seed(3))
    for traj in tf.integrate(model, starts).permute(1, 0, 2):
        ax.plot(*traj.T, color="0.6", lw=0.6, alpha=0.7)
    qx, qy = np.meshgrid(np.linspace(-7, 7, 15), np.linspace(-7, 7, 15))
    q = torch.tensor(np.stack([qx.ravel(), qy.ravel()], 1), dtype=torch.float32)
    with torch.no_grad():
        v = model(q, torch.full((len(q),), 0.5)).numpy()
    ax.quiver(qx, qy, v[:, 0], v[:, 1], color="0.75", width=0.003, scale=120)
    for name, y in TARGETS.items():
        for x0 in SOURCES:
            ax.plot([x0[0], y[0]], [x0[1], y[1]], color=COLOURS[name], lw=1.5)
        ax.plot(*y, "*", ms=14, color=COLOURS[name], mec="k", label=f"{name} target {y}")
    ax.plot(*np.array(SOURCES).T, "ko", ms=6, label="x0")
    ax.set(xlim=WINDOW, ylim=WINDOW, aspect="equal", title="learned flow (grey: ODE paths; arrows: v(x, 0.5))\n"
           "and affine paths x0 -> y")
    ax.legend(fontsize=7, loc="lower left")
    markers = dict(zip(SOURCES, ("o", "s", "^")))
    for ax, name in zip(axes[0, 1:].tolist() + [axes[1, 0]], TARGETS):
        for i, x0 in enumerate(SOURCES):
            z = paths[name, x0]
            ax.plot(ts, z, ls="--", color=f"C{i}", lw=1)
            ax.plot(ts, ts**2 * z, color=f"C{i}", lw=2, marker=markers[x0], markevery=10,
                    label=f"x0 = {x0}")
        ax.set(yscale="log", ylim=(1e-3, 1e3), xlabel="t", ylabel="mismatch",
               title=f"{name} target y = {TARGETS[name]}\ndashed: raw $Z_t$, solid: $t^2 Z_t$")
        ax.legend(fontsize=8)
    for ax, (agg, h) in zip(axes[1, 1:], maps.items()):
        im = ax.pcolormesh(h["X1"], h["X2"], np.log10(h["map"]).reshape(h["X1"].shape), cmap="viridis", shading="auto")
        ax.plot(*np.array(tf.CLUSTERS).T, "w+", ms=10)
        for name, y in TARGETS.items():
            ax.plot(*y, "*", ms=12, color=COLOURS[name], mec="k")
        ax.set(aspect="equal", title=f"score map $\\log_{{10}} H$, {agg} over K = 10 paths, T = 10, $w = t^2$")
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("Fig. 7: flow mismatching with pooled normal clusters")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    args = tf.parse_args(__doc__, grid_n=60)
    torch.set_num_threads(1)
    t0 = time.time()
    model = tf.train_flow(tf.sample_clusters, steps=args.steps, seed=args.seed)
    print(f"trained the MLP flow in {time.time() - t0:.1f} s")
    ts = np.linspace(0.01, 0.99, 99)
    paths = along_paths(model, ts)
    i1, i9 = np.searchsorted(ts, 0.1 - 1e-9), np.searchsorted(ts, 0.9 - 1e-9)
    print(f"{'target':>8} {'x0':>12} {'Z(.1)':>7} {'Z(.9)':>7} {'t2Z(.1)':>7} {'t2Z(.9)':>7} {'argmax t2Z':>10} "
          f"{'cos(.5)':>7} {'cos(.9)':>7}")
    for (name, x0), z in paths.items():
        w = ts**2 * z
        print(f"{name:>8} {str(x0):>12} {z[i1]:7.2f} {z[i9]:7.2f} {w[i1]:7.3f} {w[i9]:7.3f} {ts[w.argmax()]:10.2f} "
              f"{alignment(model, TARGETS[name], x0, 0.5):7.2f} {alignment(model, TARGETS[name], x0, 0.9):7.2f}")
    print("cos: cosine between v(x_t, t) and y - x0")
    cfg = ScoreConfig(seed=args.seed)
    maps = {}
    for agg in ("min", "mean"):
        s = target_scores(model, replace(cfg, aggregator=agg))
        top, med = s["normals"].max(), np.median(s["normals"])
        print(f"[{agg}] normal scores: max {top:.3f}, median {med:.3f} (3 centres + 100 samples); "
              + ", ".join(f"{n} {s[n]:.3f} ({s[n] / top:.2f}x max normal)" for n in TARGETS if n != "normal"))
        maps[agg] = off_support(model, args.grid, replace(cfg, aggregator=agg))
        print(f"[{agg}] grid points > 2 from every centre vs normals: ROC-AUC {maps[agg]['auc']:.4f}, "
              f"{maps[agg]['above']:.3f} of them above the highest normal score")
    path = args.out / "fig7_pooled_clusters.png"
    plot(model, ts, paths, maps, path)
    print(f"wrote {path} ({time.time() - t0:.1f} s in all)")


if __name__ == "__main__":
    main()
