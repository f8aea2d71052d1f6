"""Shared pieces of the 2-D toy examples of Appendix B: the toy data, a time-conditioned MLP
velocity field v(x, t), its CFM training (Eq. 1, the core's `cfm_loss`), and small helpers
that score 2-D points with the core scorer (Eqs. 2-4, `mismatch_heat`).

The figure scripts import this module:

    python toys/half_moon.py        # Fig. 5 (App. B.1): score maps over (T, K)
    python toys/time_weighting.py   # Fig. 6 (App. B.2): per-time maps and the t^2 aggregate
    python toys/pooled_clusters.py  # Fig. 7 (App. B.3): three clusters, mismatch along paths
    python toys/overview.py         # Figs. 1 and 3: maps at several t, flows, mismatch vs t

A 2-D point y is scored as a 1x1 "image" with two channels, (B, 2, 1, 1), so the heat of
`mismatch_heat` is (B, 1, 1): the same K-path / T-time / min / t^2 code as for images.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flow_mismatch import ScoreConfig, cfm_loss, mismatch_heat, path_noise  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"

# ----------------------------------------------------------------------------
# Toy data. Half-moon (App. B.1): the upper semicircle with centre (0, 3) and radius 5,
# thickened into a thin band by N(0, 0.1^2) radial noise so that the flow has a density
# to learn. Pooled clusters (App. B.3): three isotropic Gaussian clusters.

CENTRE, RADIUS, BAND = (0.0, 3.0), 5.0, 0.1
CLUSTERS, CLUSTER_STD = ((-4.0, 4.0), (4.0, 4.0), (0.0, -4.0)), 0.3


def sample_half_moon(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 2) points of the upper semicircle band."""
    angle = math.pi * torch.rand(n, generator=gen)
    r = RADIUS + BAND * torch.randn(n, generator=gen)
    return torch.stack([CENTRE[0] + r * torch.cos(angle), CENTRE[1] + r * torch.sin(angle)], 1)


def sample_clusters(n: int, gen: torch.Generator) -> torch.Tensor:
    """(n, 2) points, each from one of the three clusters with equal probability."""
    which = torch.randint(len(CLUSTERS), (n,), generator=gen)
    return torch.tensor(CLUSTERS)[which] + CLUSTER_STD * torch.randn(n, 2, generator=gen)


def distance_to_arc(p: np.ndarray) -> np.ndarray:
    """Euclidean distance of points (..., 2) to the closed upper semicircle (the normal support).
    Above the centre line the nearest point is the radial projection, below it an endpoint."""
    d = p - np.array(CENTRE)
    radial = np.abs(np.hypot(d[..., 0], d[..., 1]) - RADIUS)
    ends = np.minimum(np.hypot(d[..., 0] - RADIUS, d[..., 1]), np.hypot(d[..., 0] + RADIUS, d[..., 1]))
    return np.where(d[..., 1] >= 0, radial, ends)


def arc_points(n: int = 200) -> np.ndarray:
    """(n, 2) points on the semicircle itself, for drawing the normal support."""
    a = np.linspace(0, np.pi, n)
    return np.stack([CENTRE[0] + RADIUS * np.cos(a), CENTRE[1] + RADIUS * np.sin(a)], 1)


# ----------------------------------------------------------------------------
# Velocity field: an MLP on (x, Fourier features of t). It takes points as (N, 2) or as
# 1x1 two-channel images (N, 2, 1, 1) and returns velocities of the same shape, so the
# core's cfm_loss and mismatch_heat call it unchanged as model(xt, t, labels).


class VelocityMLP(nn.Module):
    def __init__(self, width: int = 128, depth: int = 4, freqs: int = 4):
        super().__init__()
        self.register_buffer("freqs", math.pi * torch.arange(1, freqs + 1).float())
        layers, d = [], 2 + 1 + 2 * freqs
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        self.net = nn.Sequential(*layers, nn.Linear(d, 2))

    def forward(self, xt, t, labels=None):
        x = xt.reshape(len(xt), 2)
        wt = t.float()[:, None] * self.freqs  # (N, freqs)
        h = torch.cat([x, t.float()[:, None], torch.sin(wt), torch.cos(wt)], 1)
        return self.net(h).reshape(xt.shape)


def train_flow(sample, steps: int = 3000, batch: int = 256, lr: float = 2e-3, seed: int = 0) -> VelocityMLP:
    """Fit v to the flow N(0, I) -> `sample` with the CFM loss of Eq. (1); fresh data every
    step from a seeded generator, so a run is a function of `seed` alone (seconds on a CPU)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = VelocityMLP()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = cfm_loss(model, sample(batch, gen), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


# ----------------------------------------------------------------------------
# Scoring 2-D points with the core scorer, and the quantities it does not expose.


def score(model, y: torch.Tensor, cfg: ScoreConfig = ScoreConfig()) -> torch.Tensor:
    """H of Eq. (4) for points y (B, 2) -> (B,), with the core's mismatch_heat."""
    return mismatch_heat(model, y.reshape(-1, 2, 1, 1), cfg=cfg, batch=max(cfg.max_batch, 1 << 16))[:, 0, 0]  # MLP forwards are cheap


@torch.no_grad()
def mismatch_at(model, y: torch.Tensor, t: float, cfg: ScoreConfig = ScoreConfig()) -> torch.Tensor:
    """delta_t of Eq. (3) at one time t for points y (B, 2) -> (B,): the path aggregate of
    Z_t^(k) = |v(x_t^k, t) - (y - x0^k)|^2 over the same K noise draws as mismatch_heat."""
    B = len(y)
    x0 = torch.stack([path_noise(cfg.seed, [0] * B, k, (2,), y.device) for k in range(cfg.K)])  # (K, B, 2)
    xt = (1 - t) * x0 + t * y  # Eq. (2)
    v = model(xt.reshape(-1, 2), torch.full((cfg.K * B,), t)).reshape(cfg.K, B, 2)
    z = (v - (y - x0)).square().sum(-1)  # (K, B), Eq. (3)
    if cfg.aggregator == "mean":
        return z.mean(0)
    if cfg.aggregator == "min":
        return z.amin(0)
    raise ValueError(f"mismatch_at: aggregator {cfg.aggregator!r} not supported (min or mean)")


@torch.no_grad()
def path_mismatch(model, y, x0, ts) -> np.ndarray:
    """Raw Z_t = |v(x_t, t) - (y - x0)|^2 (Eq. 3) along the one affine path x0 -> y (Eq. 2)
    at the times ts; y, x0 are 2-vectors. Returns (len(ts),)."""
    y, x0 = torch.as_tensor(y, dtype=torch.float32), torch.as_tensor(x0, dtype=torch.float32)
    t = torch.as_tensor(ts, dtype=torch.float32)
    xt = (1 - t[:, None]) * x0 + t[:, None] * y
    return (model(xt, t) - (y - x0)).square().sum(-1).numpy()


@torch.no_grad()
def integrate(model, x0: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """Euler trajectories of dx/dt = v(x, t) from x0 (N, 2): (steps + 1, N, 2)."""
    xs = [x0]
    for i in range(steps):
        t = torch.full((len(x0),), i / steps)
        xs.append(xs[-1] + model(xs[-1], t) / steps)
    return torch.stack(xs)


def grid(n: int, x1=(-8.0, 8.0), x2=(-3.0, 14.0)):
    """An n x n grid over the window of App. B.1: (points (n*n, 2) tensor, X1, X2 arrays)."""
    X1, X2 = np.meshgrid(np.linspace(*x1, n), np.linspace(*x2, n))
    return torch.tensor(np.stack([X1.ravel(), X2.ravel()], 1), dtype=torch.float32), X1, X2


def normalise(h: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1], as the maps are displayed."""
    return (h - h.min()) / max(h.max() - h.min(), 1e-12)


def roc_auc(labels, scores) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


# ----------------------------------------------------------------------------
# Command line shared by the figure scripts.


def parse_args(doc: str, grid_n: int = 80) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT, help="folder for the PNG (default: toys/out/)")
    p.add_argument("--grid", type=int, default=grid_n, help=f"grid points per axis (default {grid_n})")
    p.add_argument("--steps", type=int, default=3000, help="CFM training steps (default 3000)")
    p.add_argument("--seed", type=int, default=0, help="training and scoring seed (default 0)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def setup_matplotlib():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
