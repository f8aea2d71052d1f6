"""Figs. 1 and 3: the mechanism of Flow Mismatching on the half-moon flow.

Fig. 3, top: normalised mismatch maps delta_t (min over K = 10 paths, Eq. 3) at several t
and the t^2-weighted aggregate H (Eq. 4, core mismatch_heat). Fig. 3, bottom: the learned
flow and affine paths (Eq. 2) from x0 in {(-2, 0), (2, 0)} to an on-manifold target
y = (3, 7) and to the off-manifold y = (1, 2), with Z_t = |v(x_t, t) - (y - x0)|^2 along
each path, dashed raw and solid t^2-scaled. Fig. 1: the same paths in the (x, t) plane,
with x summarised by the distance r = |x - (0, 3)| to the half-moon's centre (the normal
data sit at r = 5), and the learned vs the path velocity at selected times.

    python toys/overview.py    # ~30 s on a laptop CPU -> toys/out/fig3_overview.png, fig1_xt_plane.png
"""

from __future__ import annotations

import time

import numpy as np
import torch

import toy_flow as tf
from flow_mismatch import ScoreConfig

Y_NORMAL, Y_ANOMALY = (3.0, 7.0), (1.0, 2.0)  # on the arc (|y - c| = 5) and off it (distance 3.59)
SOURCES = ((-2.0, 0.0), (2.0, 0.0))
SHOWN_T = (0.1, 0.3, 0.5, 0.7, 0.9)
ARROW_T = (0.25, 0.5, 0.75)


def path_summary(model, ts) -> dict:
    """{(target, x0): raw Z_t at ts} for the two targets and two sources of Fig. 3."""
    return {(name, x0): tf.path_mismatch(model, y, x0, ts)
            for name, y in (("normal", Y_NORMAL), ("anomaly", Y_ANOMALY)) for x0 in SOURCES}


@torch.no_grad()
def velocities(model, y, x0, t):
    """(x_t, v(x_t, t), y - x0) as numpy 2-vectors."""
    y, x0 = torch.tensor(y), torch.tensor(x0)
    xt = (1 - t) * x0 + t * y
    return xt.numpy(), model(xt[None], torch.tensor([t]))[0].numpy(), (y - x0).numpy()


def plot_fig3(model, pts, X1, X2, maps, agg, ts, paths, path):
    plt = tf.setup_matplotlib()
    from matplotlib.colors import PowerNorm

    fig = plt.figure(figsize=(18, 8.5), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.1])
    axes = top.subplots(1, len(SHOWN_T) + 1, sharey=True)
    arc = tf.arc_points()
    panels = [(h, f"$\\delta_t$, t = {t}") for t, h in zip(SHOWN_T, maps)] + [(agg, "$t^2$-weighted aggregate H")]
    for ax, (h, title) in zip(axes, panels):
        ax.pcolormesh(X1, X2, tf.normalise(h).reshape(X1.shape), cmap="viridis", norm=PowerNorm(0.5, 0, 1),
                      shading="auto")
        ax.plot(arc[:, 0], arc[:, 1], color="tab:blue", lw=1.5)
        ax.set(title=title, aspect="equal", xlabel="$x_1$")
    axes[0].set_ylabel("$x_2$")
    top.suptitle("Fig. 3 (top): normalised mismatch maps (min over K = 10 paths, sqrt colour scale); "
                 "blue: normal support")
    b = bottom.subplots(1, 3, width_ratios=[1, 1, 1.3])
    starts = torch.randn(50, 2, generator=torch.Generator().manual_seed(3))
    trajs = tf.integrate(model, starts).permute(1, 0, 2)
    for ax, (name, y, colour) in zip(b[:2], (("normal", Y_NORMAL, "tab:green"), ("anomaly", Y_ANOMALY, "tab:red"))):
        for traj in trajs:
            ax.plot(*traj.T, color="0.7", lw=0.6)
        ax.plot(arc[:, 0], arc[:, 1], color="tab:blue", lw=2)
        for x0 in SOURCES:
            ax.plot([x0[0], y[0]], [x0[1], y[1]], color=colour, lw=2)
            for t in ARROW_T:
                xt, v, g = velocities(model, y, x0, t)
                ax.quiver(*xt, *g, color=colour, angles="xy", scale_units="xy", scale=4, width=0.008)
                ax.quiver(*xt, *v, color="k", angles="xy", scale_units="xy", scale=4, width=0.008)
        ax.plot(*np.array(SOURCES).T, "ko")
        ax.plot(*y, "*", ms=16, color=colour, mec="k")
        ax.set(xlim=(-8, 8), ylim=(-3, 10), aspect="equal")
        ax.set_title(f"{name} y = {y}: learned flow (grey), affine paths;\narrows at t = {ARROW_T}: "
                     f"black v(x_t, t), {colour[4:]} y - x0 (1/4 length)", fontsize=9)
    ax = b[2]
    for (name, x0), z in paths.items():
        colour = "tab:green" if name == "normal" else "tab:red"
        marker = "o" if x0 == SOURCES[0] else "s"
        ax.plot(ts, z, ls="--", color=colour, lw=1)
        ax.plot(ts, ts**2 * z, color=colour, lw=2, marker=marker, markevery=10, label=f"{name}, x0 = {x0}")
    ax.set(yscale="log", xlabel="t", ylabel="mismatch", title="mismatch along the paths: dashed raw $Z_t$, "
           "solid $t^2 Z_t$")
    ax.legend(fontsize=8)
    bottom.suptitle("Fig. 3 (bottom): flows and paths for an on-manifold and the off-manifold target")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_fig1(model, path):
    """(x, t) plane with x summarised by r = |x - c|."""
    plt = tf.setup_matplotlib()
    c = np.array(tf.CENTRE)
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    steps = 100
    starts = torch.randn(60, 2, generator=torch.Generator().manual_seed(3))
    tt = np.linspace(0, 1, steps + 1)
    for traj in tf.integrate(model, starts, steps).permute(1, 0, 2).numpy():
        ax.plot(tt, np.linalg.norm(traj - c, axis=1), color="0.75", lw=0.7)
    ax.fill_between([0.99, 1.03], tf.RADIUS - 3 * tf.BAND, tf.RADIUS + 3 * tf.BAND, color="tab:blue", alpha=0.6)
    x0 = SOURCES[1]
    for y, colour, label in ((Y_NORMAL, "tab:green", "normal target"), (Y_ANOMALY, "tab:red", "anomalous target")):
        r = [np.linalg.norm((1 - t) * np.array(x0) + t * np.array(y) - c) for t in tt]
        ax.plot(tt, r, color=colour, lw=2.5, label=f"affine path {x0} -> {y} ({label})")
        for t in ARROW_T:
            xt, v, g = velocities(model, y, x0, t)
            u = (xt - c) / np.linalg.norm(xt - c)  # dr/dt = u . velocity
            r_t = np.linalg.norm(xt - c)
            for vel, col in ((g, colour), (v, "k")):
                ax.annotate("", xy=(t + 0.12, r_t + 0.12 * u @ vel), xytext=(t, r_t),
                            arrowprops=dict(arrowstyle="->", color=col, lw=2))
    ax.set(xlabel="t", ylabel="r = |x - (0, 3)|", xlim=(0, 1.15), ylim=(0, 8),
           title="Fig. 1: learned flow (grey) and affine paths in the (x, t) plane;\n"
                 "arrows: black learned v(x_t, t), coloured path velocity y - x0 (radial parts); blue: normal data")
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    args = tf.parse_args(__doc__, grid_n=60)
    torch.set_num_threads(1)
    t0 = time.time()
    model = tf.train_flow(tf.sample_half_moon, steps=args.steps, seed=args.seed)
    print(f"trained the MLP flow in {time.time() - t0:.1f} s")
    pts, X1, X2 = tf.grid(args.grid)
    d = tf.distance_to_arc(pts.numpy())
    cfg = ScoreConfig(seed=args.seed)
    maps = [tf.mismatch_at(model, pts, t, cfg).numpy() for t in SHOWN_T]
    agg = tf.score(model, pts, cfg).numpy()
    for name, h in zip([f"t = {t}" for t in SHOWN_T] + ["aggregate"], maps + [agg]):
        print(f"map {name:>10}: ROC-AUC(distance > 1) {tf.roc_auc(d > 1, h):.3f}, "
              f"far/near {h[d > 2].mean() / h[d < 0.3].mean():6.1f}")
    ts = np.linspace(0.01, 0.99, 99)
    paths = path_summary(model, ts)
    i1, i5, i9 = (np.searchsorted(ts, s - 1e-9) for s in (0.1, 0.5, 0.9))
    print(f"{'target':>8} {'x0':>12} {'t2Z(.1)':>8} {'t2Z(.5)':>8} {'t2Z(.9)':>8} {'mean t2Z':>8} {'mean Z':>8}")
    for (name, x0), z in paths.items():
        w = ts**2 * z
        print(f"{name:>8} {str(x0):>12} {w[i1]:8.3f} {w[i5]:8.2f} {w[i9]:8.2f} {w.mean():8.2f} {z.mean():8.2f}")
    for x0 in SOURCES:
        ratio = (ts**2 * paths["anomaly", x0]).mean() / (ts**2 * paths["normal", x0]).mean()
        print(f"x0 = {x0}: mean t^2 Z_t, anomaly / normal = {ratio:.1f}")
    plot_fig3(model, pts, X1, X2, maps, agg, ts, paths, args.out / "fig3_overview.png")
    plot_fig1(model, args.out / "fig1_xt_plane.png")
    print(f"wrote {args.out / 'fig3_overview.png'} and {args.out / 'fig1_xt_plane.png'} "
          f"({time.time() - t0:.1f} s in all)")


if __name__ == "__main__":
    main()
