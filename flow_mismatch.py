"""Flow Mismatching: unsupervised anomaly detection from velocity discrepancies in a
flow-matching model trained on normal images only.

A U-Net v(x, t) learns the flow from Gaussian noise to normal images (Eq. 1). To test an
image y we walk K straight paths x_t = (1 - t) x0 + t y from random noise x0 to y and, at
T interior times, compare the learned velocity v(x_t, t) with the path's own velocity
y - x0 (Eqs. 2-3). Where y holds something the normal flow would not produce, the two
disagree; the t^2-weighted, path-aggregated squared disagreement is the heatmap H and
its peak the image score S (Eq. 4).

    python flow_mismatch.py demo      # tiny CPU run on generated data; train, test, score ...: README.md

Contents (tests/test_reference.py keeps it true). The method, in the paper's order:
    Config              knobs; ModelConfig, presets (App. C.1); WEIGHTS w(t), IMAGE_SCORES S; MethodConfig
    U-Net               App. C.1: residual blocks, time modulation, attention
    CFM loss            Eq. (1)
    Scorer              Eqs. (2)-(4): the definition one path, one time, one forward at a time; then batched
The machinery:
    Scorer machinery    a run's forward batch and precision, the compiled U-Net
    Baselines           ReconFlow (Eqs. 28-29) and a one-step velocity baseline (Table 2); SCORERS
    Run config          TrainConfig, the CPU presets' recipes; ScoreConfig: MethodConfig and a run's options; note
    Tiles               large images: tile grid, blending window, stitching, position labels
    Training loop       StableAdamW (App. C.2), setup, one CFM step, the loop; resume, signals, log
    Checkpoints and output files  atomic writes only where we own it, a folder's lock, staged outputs;
                        checkpoints read as plain data
    Devices and DDP     torchrun process groups, device choice, inference layout
    Metrics             the seven numbers of Table 1
    Data                benchmark layouts read in place, every mask encoding; native-size images, tiles; demo data
    Evaluation          test sets scored, overlays, maps at the original size, tables, report.html; sweeps
    Calibration         split-conformal p-values, thresholds and masks with a false-alarm guarantee
    Export              the whole calibrated scorer of one category as one torch.export archive (.pt2) that runs
                        with torch alone; archives read without unpickling, parity checked on every export
    Explain             one image inside the scorer: x_t, w(t) delta_t per t, min vs mean over paths, H
    Speed               bench: U-Net before/eager/compiled, bf16 weights, CUDA graphs, latency and throughput,
                        training, the naive loop, the exported scorer
    The paper's numbers  Tables 1, 4, 5 for `compare`
    From Python         fm.load(ckpt).predict(images); train, evaluate, calibrate, score as functions
    CLI                 train, test, score, calibrate, explain, demo, compare, bench, export
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import hashlib
import itertools
import json
import math
import os
import pickle
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
import types
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

if __name__ == "__main__":  # Ctrl-C or SIGTERM while torch loads (seconds): one line, not a traceback
    for _sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_sig, lambda sig, _: (print("flow_mismatch.py: interrupted", file=sys.stderr),
                                            os._exit(128 + sig)))

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------
# Config: one dataclass per concern. Each field is a `knob`: its default, its --help text and its
# range live here once; the CLI's flags are generated from them and __post_init__ enforces them,
# so Python callers and the command line are refused the same values with the same message.

class UserError(Exception):
    """Reported as one line without a traceback; exit status 2 for bad input. keyword: the argument
    at fault, named `keyword=` from Python and --keyword by the command line (see cli_line); flag: the
    flag a knob's check names, as "flag: message" for both."""

    def __init__(self, message, status=2, keyword=None, flag=None):
        super().__init__(f"{keyword}=: {message}" if keyword else f"{flag}: {message}" if flag else message)
        self.status, self.keyword, self.flag, self.message = status, keyword, flag, message

    def cli_line(self) -> str:
        return f"--{self.keyword.replace('_', '-')}: {self.message}" if self.keyword else str(self)


def knob(default, help, choices=None, ge=None, gt=None, le=None, lt=None, check=None, flag=None, kind=None):
    """A config field with the help text, kind (the type of its value or of a tuple's items; by default the
    default's), choices and bounds it must keep; check: a further rule, raising ValueError; flag: if not --name."""
    kind = kind or type(default[0] if isinstance(default, tuple) else default)
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata=dict(help=help, kind=kind, choices=choices, bounds=bounds, check=check,
                                                flag=flag))


def flag_of(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "True or False"}
BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
          "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def check_knob(f, value, flag=None):
    """`value` if it keeps field f's kind, choices, bounds and check (each tuple item), else UserError("flag: why")."""
    flag, m = flag or flag_of(f), f.metadata
    if value is None and f.default is None:  # not set
        return value
    if isinstance(value, tuple) != isinstance(f.default, tuple):
        raise UserError(f"{value!r} is not {'a tuple' if isinstance(f.default, tuple) else 'one value'}", flag=flag)
    for v in value if isinstance(value, tuple) else (value,):
        ok = isinstance(v, (int, float) if m["kind"] is float else m["kind"])
        if not ok or (isinstance(v, bool) and m["kind"] is not bool):
            raise UserError(f"{v!r} is not {KIND_NAMES[m['kind']]}", flag=flag)
        if m.get("choices") and v not in m["choices"]:
            raise UserError(f"{v!r} is not one of {', '.join(m['choices'])}", flag=flag)
        if not all(ok(v, b) for op, b in m.get("bounds", {}).items() for _, ok in [BOUNDS[op]]):
            rule = " and ".join(f"{BOUNDS[op][0]} {b}" for op, b in m["bounds"].items())
            raise UserError(f"must be {rule}, got {v}", flag=flag)
        try:
            if m["check"]:
                m["check"](v)
        except ValueError as e:  # the check says why; the flag is named here, once
            raise UserError(str(e), flag=flag)
    return value


def check_knobs(cfg) -> None:
    for f in fields(cfg):
        check_knob(f, getattr(cfg, f.name))


SEED = dict(ge=0, le=2**32 - 1)  # the range of a --seed


@dataclass(frozen=True)
class ModelConfig:
    """U-Net shape. Preset `paper` is App. C.1 exactly."""

    base_channels: int = 64
    channel_mult: tuple = (1, 1, 2, 2, 4, 4)  # six stages, 128 -> 4 at 128^2
    num_res_blocks: int = 3
    attention_ds: tuple = (4, 8, 16, 32)  # downsample rates: 32^2, 16^2, 8^2, 4^2 at 128^2
    head_channels: int = 32
    dropout: float = 0.05
    norm_groups: int = 32
    in_channels: int = 3
    num_classes: int = 0  # 0: unconditional


PRESETS = {
    "paper": ModelConfig(),
    # CPU preset for real data: same blocks, half the width, four stages.
    "small": ModelConfig(base_channels=32, channel_mult=(1, 2, 2, 4), num_res_blocks=2,
                         attention_ds=(8,), norm_groups=16),
    # Tests and the demo: minutes on two CPU cores.
    "tiny": ModelConfig(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_ds=(4,), head_channels=16, norm_groups=8),
}


WEIGHTS = {  # w(t) of Eq. (4), the values of --weight; t2 is Prop. 4.4, snr the inverse-variance weight in y-space
    "1": lambda t: torch.ones_like(t),
    "t": lambda t: t,
    "t2": lambda t: t**2,
    "snr": lambda t: t**2 / (1 - t) ** 2,
}

IMAGE_SCORES = {  # S of Eq. (4) from the flattened heatmaps (B, H * W) -> (B,), the values of --image-score
    "paper": lambda h: h.amax(1) + h.topk(max(1, math.ceil(0.01 * h.shape[1])), dim=1).values.mean(1),
    "max": lambda h: h.amax(1),
}


@dataclass(frozen=True)
class MethodConfig:
    """The paper's test-time knobs of Eqs. (3)-(4), defaults Sec. 5.1; ScoreConfig (below the ruler) adds a run's."""

    K: int = knob(10, "paths per image (Eq. 3)", ge=1, le=1000, flag="-K")
    T: int = knob(10, "interior times j / (T + 1) (Eq. 4)", ge=1, le=1000, flag="-T")
    aggregator: str = knob("min", "over paths: min | mean | quantile:ALPHA (Eq. 3)",
                           check=lambda a: aggregator_rank(a, 1))
    weight: str = knob("t2", "w(t) of Eq. (4); t2: t^2 (Prop. 4.4)", choices=tuple(WEIGHTS))
    seed: int = knob(0, "seed of the paths x0", **SEED)
    image_score: str = knob("paper", "S of Eq. (4); paper: max + mean of the top 1 %% of H",
                            choices=tuple(IMAGE_SCORES))

    def __post_init__(self):
        check_knobs(self)


# ----------------------------------------------------------------------------
# U-Net (App. C.1): residual blocks with scale-shift time modulation, residual
# up/downsampling, multi-head self-attention at low resolutions.

def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of 1000 t (t in [0, 1]), (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv; time scale-shift; dropout; optional resampling."""

    def __init__(self, cin, cout, emb_dim, dropout, groups, resample=None):
        super().__init__()
        self.resample = (nn.AvgPool2d(2) if resample == "down" else nn.Upsample(scale_factor=2, mode="nearest")
                         if resample == "up" else nn.Identity())
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.conv1(self.resample(F.silu(self.norm1(x))))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(self.resample(x)) + h


class Attention(nn.Module):
    """Self-attention over pixels, 32 channels per head, zero-initialised output."""

    def __init__(self, ch, head_channels, groups):
        super().__init__()
        self.heads = ch // head_channels
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj = nn.Conv1d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        # Tokens (B, L, C) and the 1x1 convolutions as F.linear: q, k, v have stride 1 along channels, as the
        # fused attention kernels need (strided ones fall back to an L x L matrix, 5x slower at L = 1024 on CPU).
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C); contiguous for channels_last x
        qkv = F.linear(tokens, self.qkv.weight[:, :, 0], self.qkv.bias)  # (B, L, 3C)
        q, k, v = qkv.view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, heads, L, C/heads)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        h = F.linear(h, self.proj.weight[:, :, 0], self.proj.bias)  # (B, L, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class UNet(nn.Module):
    """v_theta(x_t, t, label): (N, 3, H, W), (N,), (N,) -> (N, 3, H, W)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ch0, emb_dim, g = cfg.base_channels, 4 * cfg.base_channels, cfg.norm_groups
        self.time_mlp = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(cfg.num_classes, emb_dim) if cfg.num_classes > 0 else None

        def block(cin, cout, ds, resample=None):
            layers = [ResBlock(cin, cout, emb_dim, cfg.dropout, g, resample)]
            if ds in cfg.attention_ds and resample is None:
                layers.append(Attention(cout, cfg.head_channels, g))
            return nn.ModuleList(layers)

        self.stem = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, ds = [ch0], ch0, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(block(ch, mult * ch0, ds))
                ch = mult * ch0
                skips.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(block(ch, ch, ds, "down"))
                skips.append(ch)
                ds *= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, cfg.dropout, g),
                                  Attention(ch, cfg.head_channels, g),
                                  ResBlock(ch, ch, emb_dim, cfg.dropout, g)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = block(ch + skips.pop(), mult * ch0, ds)
                ch = mult * ch0
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(ResBlock(ch, ch, emb_dim, cfg.dropout, g, "up"))
                    ds //= 2
                self.up.append(layers)
        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.cfg.channel_mult) - 1)

    def forward(self, x, t, labels=None):
        emb = self.time_mlp(time_embedding(t, self.cfg.base_channels).to(x.dtype))  # x.dtype: bf16 weights too
        if self.label_emb is not None:
            emb = emb + self.label_emb(labels)
        h = self.stem(x)
        hs = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, emb)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layers in self.up:
            h = torch.cat([h, hs.pop()], dim=1)
            for layer in layers:
                h = layer(h, emb)
        return self.out(h)


def build_model(preset: str = "paper", num_classes: int = 0) -> UNet:
    if preset not in PRESETS:
        raise UserError(f"--preset: unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    return UNet(replace(PRESETS[preset], num_classes=num_classes))


# ----------------------------------------------------------------------------
# CFM loss (Eq. 1): the whole training objective.

def cfm_loss(model, y, labels=None, generator=None):
    """Eq. (1): regress v(x_t, t) on the path velocity y - x0, with x_t = (1 - t) x0 + t y."""
    x0 = torch.randn(y.shape, generator=generator, device=y.device)
    t = torch.rand(y.shape[0], generator=generator, device=y.device)
    tb = t.view(-1, *[1] * (y.dim() - 1))
    xt = (1 - tb) * x0 + tb * y
    return F.mse_loss(model(xt, t, labels).float(), y - x0)


# ----------------------------------------------------------------------------
# Scorer (Eqs. 2-4): K paths x T times of velocity mismatch -> heatmap H, score S. First the
# definition, one path, one time, one forward at a time; then the same sums batched.

def aggregator_rank(aggregator: str, K: int):
    """Order statistic kept by Eq. (3)'s aggregator: 1 for min, ceil(alpha K) for quantile:alpha, None for mean."""
    if aggregator in ("min", "mean"):
        return 1 if aggregator == "min" else None
    with contextlib.suppress(ValueError):  # an alpha that is no number: the error below
        alpha = float(aggregator.removeprefix("quantile:"))
        if aggregator.startswith("quantile:") and 0 < alpha <= 1:
            return max(1, math.ceil(alpha * K))
    raise ValueError(f"{aggregator!r} is not min, mean or quantile:ALPHA with 0 < ALPHA <= 1")


def fold_path(acc, z: torch.Tensor, m):
    """Eq. (3)'s aggregation over paths, one path at a time: path map z folded into `acc` (None at first),
    the paths' sum (mean: m None) or their m smallest values on dim 0 (min: m = 1), so memory is not K maps."""
    if m is None:
        return z if acc is None else acc + z
    acc = z[None] if acc is None else torch.cat([acc, z[None]])
    return acc.topk(min(m, len(acc)), dim=0, largest=False).values


def path_aggregate(acc, m, K: int) -> torch.Tensor:
    """delta of Eq. (3) from fold_path's aggregate of all K paths: their mean, or their m-th smallest."""
    return acc / K if m is None else acc.amax(0)


def seed_mix(*ints) -> int:
    """One 63-bit seed from integers (seed, place, path, ...), each folded in with the splitmix64 finaliser
    (Steele, Lea and Flood 2014): neighbouring inputs give unrelated seeds, alike on every run, machine and Python."""
    h = 0
    for v in ints:
        h = ((h ^ int(v)) + 0x9E3779B97F4A7C15) & 0xFFFF_FFFF_FFFF_FFFF
        h = ((h ^ h >> 30) * 0xBF58476D1CE4E5B9) & 0xFFFF_FFFF_FFFF_FFFF
        h = ((h ^ h >> 27) * 0x94D049BB133111EB) & 0xFFFF_FFFF_FFFF_FFFF
        h ^= h >> 31
    return h >> 1


def path_noise(seed: int, places, k: int, shape, device) -> torch.Tensor:
    """x0 of path k for images at `places`, (len(places), *shape): a function of (seed, place, k)
    only, where the place is 0 for a whole image (a tile's place in its image for tiles), so an
    image's heatmap is a function of the image alone, wherever it stands in a folder, batch or call."""
    gen, x0 = torch.Generator(device=device), {}
    for place in dict.fromkeys(places):
        gen.manual_seed(seed_mix(seed, place, k))
        x0[place] = torch.randn(shape, generator=gen, device=device)
    return torch.stack([x0[place] for place in places])


def interior_times(T: int, device=None) -> torch.Tensor:
    """The T interior times j / (T + 1), j = 1..T, (T,)."""
    return torch.arange(1, T + 1, device=device) / (T + 1)


@torch.no_grad()
def mismatch_heat_naive(model, y, labels=None, cfg: MethodConfig = MethodConfig(), places=None,
                        amp=contextlib.nullcontext) -> torch.Tensor:
    """Heatmap H of Eqs. (2)-(4) as written, one path, one time, one forward at a time, for normalised images
    y (B, C, H, W) -> (B, H, W) float32: the definition. amp: the context of each forward (fp32 by default)."""
    B, C, H, W = y.shape
    places = [0] * B if places is None else places
    m = aggregator_rank(cfg.aggregator, cfg.K)
    heat = torch.zeros(B, H, W, device=y.device)
    for b in range(B):
        for j in range(1, cfg.T + 1):
            t = torch.tensor([j / (cfg.T + 1)], device=y.device)
            acc = None
            for k in range(cfg.K):
                x0 = path_noise(cfg.seed, places[b:b + 1], k, (C, H, W), y.device)
                xt = (1 - t) * x0 + t * y[b:b + 1]  # Eq. (2): x_t = (1 - t) x0 + t y
                with amp():
                    v = model(xt, t, None if labels is None else labels[b:b + 1]).float()
                z = (v - (y[b:b + 1] - x0)).square().sum(1)[0]  # Eq. (3): Z_t^(k) against the velocity y - x0
                acc = fold_path(acc, z, m)
            heat[b] += WEIGHTS[cfg.weight](t) * path_aggregate(acc, m, cfg.K) / cfg.T  # Eq. (4)
    return heat


@torch.no_grad()
def mismatch_delta(model, y, labels=None, cfg: MethodConfig = MethodConfig(), places=None, batch=64,
                   amp=contextlib.nullcontext) -> torch.Tensor:
    """delta_t of Eq. (3) at every interior time for normalised images y (B, C, H, W) -> (B, T, H, W) float32,
    batched: the K*B*T inputs run as one flat (path, image, time) sequence cut into forwards of `batch`
    inputs, and each path is folded in by fold_path once its B*T maps are done. It equals the sums of
    mismatch_heat_naive: each input (k, b, t) is the same x_t of the same x0 (path_noise: a function of
    seed, place and k), the U-Net in eval mode computes each row of a batch on its own, and paths are
    folded in the same order; only the float rounding of batched kernels differs (tests/test_scorer.py)."""
    B, C, H, W = y.shape
    K, T, device = cfg.K, cfg.T, y.device
    places = [0] * B if places is None else places
    t = interior_times(T, device)
    m = aggregator_rank(cfg.aggregator, K)
    n = B * T  # inputs per path
    acc, x0s, rows = None, {}, None  # x0 of the open paths; Z of the inputs not yet folded, in order
    for s in range(0, K * n, batch):
        e = min(K * n, s + batch)
        ks = range(s // n, (e - 1) // n + 1)  # the paths inputs s..e-1 belong to
        x0s.update({k: path_noise(cfg.seed, places, k, (C, H, W), device) for k in ks if k not in x0s})
        sl = torch.arange(s, e, device=device)
        ki, bi, ji = sl // n - ks[0], sl // T % B, sl % T
        x0 = torch.stack([x0s[k] for k in ks])[ki, bi]
        tj = t[ji].view(-1, 1, 1, 1)
        xt = (1 - tj) * x0 + tj * y[bi]  # Eq. (2)
        with amp():
            v = model(xt, t[ji], None if labels is None else labels[bi])
        z = (v.float() - (y[bi] - x0)).square().sum(1)  # Eq. (3): Z_t^(k)
        rows = z if rows is None else torch.cat([rows, z])
        while len(rows) >= n:  # the oldest open path is done
            acc, rows = fold_path(acc, rows[:n].view(B, T, H, W), m), rows[n:]
            del x0s[min(x0s)]
    return path_aggregate(acc, m, K)  # (B, T, H, W)


def mismatch_heat(model, y, labels=None, cfg: MethodConfig = MethodConfig(), places=None, batch=64,
                  amp=contextlib.nullcontext) -> torch.Tensor:
    """Heatmap H of Eq. (4) for normalised images y (B, C, H, W) -> (B, H, W) float32, batched."""
    w = WEIGHTS[cfg.weight](interior_times(cfg.T, y.device)).view(1, -1, 1, 1)
    return (w * mismatch_delta(model, y, labels, cfg, places, batch, amp)).mean(1)  # Eq. (4): H = mean_t w(t) delta_t


def image_score(heat: torch.Tensor, rule="paper") -> torch.Tensor:
    """S of Eq. (4) by IMAGE_SCORES[rule], (B, H, W) -> (B,)."""
    return IMAGE_SCORES[rule](heat.flatten(1))


# ----------------------------------------------------------------------------
# End of the method: everything above uses only torch, the standard library and names defined
# above (tests/test_reference.py). The machinery follows in the order of the contents block.
# ----------------------------------------------------------------------------
# Scorer machinery: how a run evaluates the scorer above: U-Net inputs per forward, precision and
# the compiled U-Net, passed to mismatch_heat as its `batch` and `amp` arguments.

def forward_batch(cfg: ScoreConfig, model, y) -> int:
    """U-Net inputs per forward for images y: 512 fill a GPU; on a CPU, as many as keep one
    full-resolution activation (base_channels x H x W per input) within 2^21 numbers, the
    batch that measured fastest for every preset (BENCHMARKS.md): larger ones leave the caches."""
    if cfg.max_batch or y.device.type == "cuda":
        return cfg.max_batch or 512
    return max(1, 2**21 // (model.cfg.base_channels * y.shape[-2] * y.shape[-1]))


def autocast(device: torch.device, precision="auto"):
    """bf16 on CUDA (App. C.2), full fp32 on CPU; precision "fp32" or "bf16" forces one."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


class Compiled(nn.Module):
    """The U-Net under torch.compile at one fixed batch, so that its graph compiles once: the rows of the first
    call (the scorer's first forward, a full forward batch) fix `batch`; every later call is cut into pieces of
    `batch` rows, the last padded with zeros (each row is computed on its own, so padding changes no other row).
    The first call prints the compile time. Inductor keeps what it compiled on disk (TORCHINDUCTOR_CACHE_DIR, by
    default under /tmp): the next run on the same machine compiles in seconds (BENCHMARKS.md). mode "reduce-overhead"
    (`bench --graphs`): on CUDA each piece replays one recorded CUDA graph (it needs the fixed batch), its output
    copied out before the next replay overwrites it; on a CPU, plain compiled code."""

    def __init__(self, model: UNet, mode=None):
        super().__init__()
        self.model, self.cfg, self.batch, self.compile_s, self.mode = model, model.cfg, 0, 0.0, mode
        self.compiled = torch.compile(model, fullgraph=True, dynamic=False, mode=mode)

    def forward(self, x, t, labels=None):
        first = not self.batch
        if first:
            self.batch, t0 = len(x), time.perf_counter()
        out = []
        for sl in chunks(len(x), self.batch):
            pad = self.batch - (sl.stop - sl.start)
            xs, ts = F.pad(x[sl], (0, 0, 0, 0, 0, 0, 0, pad)).contiguous(), F.pad(t[sl], (0, pad))
            ls = None if labels is None else F.pad(labels[sl], (0, pad))
            if self.mode:
                torch.compiler.cudagraph_mark_step_begin()
            v = self.compiled(xs, ts, ls)[:self.batch - pad]
            out.append(v.clone() if self.mode else v)
        if first:
            self.compile_s = time.perf_counter() - t0
            note(f"torch.compile: the U-Net at batch {self.batch} compiled in {self.compile_s:.1f} s")
        return torch.cat(out)


def chunks(n: int, size: int):
    """Slices of at most `size` rows covering range(n)."""
    return [slice(i, min(n, i + size)) for i in range(0, n, size)]


def run_options(cfg: ScoreConfig, model, y) -> dict:
    """The `batch` and `amp` arguments of the method's scorers for a run of cfg on images y."""
    return dict(batch=forward_batch(cfg, model, y), amp=lambda: autocast(y.device, cfg.precision))


def run_mismatch_heat(model, y, labels, cfg: ScoreConfig, places=None) -> torch.Tensor:
    """mismatch_heat with the run's forward batch (--max-batch) and precision (--precision)."""
    return mismatch_heat(model, y, labels, cfg, places, **run_options(cfg, model, y))


# ----------------------------------------------------------------------------
# Baselines (Table 2): on the same trained model only the test-time rule changes. Both start
# from K noisy copies y_t0 = (1 - t0) x0 + t0 y of the image, with x0 = path_noise(seed, i, k),
# and keep the order statistic of `aggregator` over the K per-path maps (min by default).

@torch.no_grad()
def reconstruction_error(model, y, labels, cfg: ScoreConfig, places, steps: int, edges=False) -> torch.Tensor:
    """The error map of y_hat, (B, C, H, W) -> (B, H, W) (labels: one per image): y_hat integrates the learned ODE
    in `steps` Euler steps from y_t0 (Eq. 28) to t = 1, the velocities in fp32 and in forward batches; the map is
    ||y - y_hat||_2 over channels (Eq. 29), with `edges` plus the same norm of the difference of Sobel gradients."""
    B, C, H, W = y.shape
    places = [0] * B if places is None else places
    x0 = torch.cat([path_noise(cfg.seed, places, k, (C, H, W), y.device) for k in range(cfg.K)])
    x, t = (1 - cfg.t0) * x0 + cfg.t0 * y.repeat(cfg.K, 1, 1, 1), torch.full((cfg.K * B,), cfg.t0, device=y.device)
    labels = None if labels is None else labels.repeat(cfg.K)
    dt = (1 - cfg.t0) / steps
    for _ in range(steps):
        with autocast(y.device, cfg.precision):
            v = torch.cat([model(x[sl], t[sl], None if labels is None else labels[sl]).float()
                           for sl in chunks(len(x), forward_batch(cfg, model, y))])
        x, t = x + dt * v, t + dt
    d = y.repeat(cfg.K, 1, 1, 1) - x  # (K*B, C, H, W), path-major
    h = d.square().sum(1).sqrt()  # Eq. (29)
    if edges:
        h = h + sobel(d).square().sum(1).sqrt()
    m, acc = aggregator_rank(cfg.aggregator, cfg.K), None
    for hk in h.view(cfg.K, B, H, W):
        acc = fold_path(acc, hk, m)
    return path_aggregate(acc, m, cfg.K)


def recon_heat(model, y, labels, cfg: ScoreConfig, places=None) -> torch.Tensor:
    """ReconFlow (App. C.2): the error map of y_hat after cfg.ode_steps Euler steps, (B, C, H, W) -> (B, H, W)."""
    return reconstruction_error(model, y, labels, cfg, places, cfg.ode_steps)


def onestep_heat(model, y, labels, cfg: ScoreConfig, places=None) -> torch.Tensor:
    """RADAR-style, reconstruction-free: one velocity at t0 gives the clean-image estimate y_hat = x_t + (1 - t) v
    (on a straight path y = x_t + (1 - t)(y - x0), with v in place of y - x0), one Euler step of ReconFlow's ODE,
    and the Sobel gradients' term in the map, (B, C, H, W) -> (B, H, W)."""
    return reconstruction_error(model, y, labels, cfg, places, 1, edges=True)


def sobel(x: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical Sobel derivatives per channel, (N, C, H, W) -> (N, 2C, H, W)."""
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device) / 8
    w = torch.stack([k, k.T])[:, None].repeat(x.shape[1], 1, 1, 1)  # (2C, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), w, groups=x.shape[1])


SCORERS = {"mismatch": run_mismatch_heat, "recon": recon_heat, "onestep": onestep_heat}


# ----------------------------------------------------------------------------
# Run config: a run's settings besides the paper's test-time knobs: TrainConfig with the CPU presets'
# recipes, ScoreConfig (MethodConfig with a run's options), and `note`, the one channel a run speaks on.

def note(message: str, every_rank=False) -> None:
    """The one channel of all a command says besides its result (warnings, progress, what a run does, errors):
    a line on stderr after the program's name, from rank 0 only (every_rank: an error that may hit one rank alone)."""
    if every_rank or int(os.environ.get("RANK", 0)) == 0:
        print(f"flow_mismatch.py: {message}", file=sys.stderr, flush=True)


# Image size, training length and learning rate of the CPU presets when --image-size, --epochs, --steps and --lr
# are not given; `paper` uses TrainConfig's (the paper's) values. 1000 steps are 10-30x fewer than the paper's 2000
# epochs, and at lr 1e-4 the model is far from fitted then; 5e-4 did better on every metric of three held-out
# photo-derived sets (BENCHMARKS.md, "CPU recipe"). They also hold out a fifth of each category's train/good as the
# calibration set of --alarm-rate: 1000 steps of batch 32 see each of a few hundred images ~100 times, so training
# is short of steps, not images, while 20-80 held-out images allow alarm rates down to 1/(n+1) = 0.05-0.01.
CPU_RECIPES = {preset: dict(image_size=64, steps=1000, lr=5e-4, calib_fraction=0.2) for preset in ("small", "tiny")}


@dataclass(frozen=True)
class TrainConfig:
    """Conditional flow matching (Eq. 1) with the optimiser of App. C.2."""

    preset: str = knob("paper", "paper: App. C.1, 45.3 M parameters, for GPUs (2000 epochs at 128^2); small: 5.2 M "
                                "parameters, for a machine with more cores (1000 steps at 64^2, about an hour on 2 "
                                "cores); tiny: 0.35 M parameters, the CPU preset, the demo and the tests (1000 steps "
                                "at 64^2, ~12 min on 2 cores)", choices=tuple(PRESETS))
    image_size: int = knob(128, "square size images are resized to (Sec. 5.1)", ge=1, le=4096)
    batch_size: int = knob(32, "images per process and step", ge=1, le=4096)
    epochs: int = knob(2000, "epochs", ge=1, le=10**6)
    steps: int = knob(None, "optimiser steps, overriding --epochs; None: by epochs", ge=1, le=10**9, kind=int)
    lr: float = knob(1e-4, "learning rate", gt=0, le=1e3)  # 100 already diverges within 3 steps (tiny)
    weight_decay: float = knob(1e-4, "decoupled weight decay", ge=0, le=1e3)
    betas: tuple = knob((0.9, 0.99), "Adam's two moment decays", ge=0, lt=1)
    eps: float = knob(1e-6, "Adam's epsilon", gt=0, le=1)
    update_rms_clip: float = knob(1.0, "StableAdamW's update-RMS clip", gt=0, le=1e3)
    seed: int = knob(0, "seed of the weights, batches, noise and dropout", **SEED)
    save_every: int = knob(1000, "steps between checkpoints", ge=1, le=10**9)
    save_epochs: tuple = knob((), "also keep ckpt_epochE.pt at these epochs (Table 9)", ge=1, le=10**6, kind=int)
    pooled: bool = knob(False, "one unconditional model for all categories (Table 8)")
    calib_fraction: float = knob(0.0, "share of each category's train/good held out, never trained on, and scored "
                                      "at the end (K = T = 10) as the calibration set of --alarm-rate; 0: the "
                                      "paper, all train", ge=0, lt=1)
    tile: int = knob(0, "train on random N x N crops at native resolution instead of resizing whole images "
                        "(large images, small defects; not with --image-size); test, score, calibrate "
                        "and explain then cover each image with tiles; 0: resize", ge=0, le=4096)
    tile_scale: float = knob(1.0, "with --tile: rescale the images by S before tiles are cut", gt=0, le=1e3)
    tile_grid: int = knob(0, "with --tile: also tell the model where a tile lies, its cell in a G x G grid over "
                             "the image (label embedding over category x cell); 0: not", ge=0, le=64)

    def __post_init__(self):
        check_knobs(self)
        factor = 2 ** (len(PRESETS[self.preset].channel_mult) - 1)  # the U-Net's total downsampling
        for flag, size in (("--image-size", self.image_size), ("--tile", self.tile or factor)):
            if size % factor:
                below = factor * max(1, size // factor)
                raise UserError(f"{size} is not a positive multiple of {factor}, the total downsampling of preset "
                                f"{self.preset} ({below} or {below + factor} would work)", flag=flag)
        for flag, value, default in (("--tile-scale", self.tile_scale, 1.0), ("--tile-grid", self.tile_grid, 0)):
            if value != default and not self.tile:
                raise UserError("give it with --tile N", flag=flag)


def train_config(preset="paper", **overrides) -> TrainConfig:
    """The TrainConfig of `preset`: a CPU preset's recipe (CPU_RECIPES) wherever `overrides` is silent;
    epochs without steps train for those epochs."""
    recipe = {k: v for k, v in CPU_RECIPES.get(preset, {}).items() if not (k == "steps" and "epochs" in overrides)}
    return TrainConfig(preset=preset, **{**recipe, **overrides})


@dataclass(frozen=True)
class ScoreConfig(MethodConfig):
    """MethodConfig and a run's options: the test-time rule, forward batch, precision, tile stride, smoothing of H."""

    max_batch: int = knob(0, "U-Net inputs per forward, the memory budget; 0: automatic (512 on CUDA, by image "
                             "size on CPU: 32 for tiny at 64^2)", ge=0, le=2**20)
    score: str = knob("mismatch", "the test-time rule (SCORERS): mismatch is Eqs. 2-4, recon (ReconFlow, App. C.2) "
                                  "and onestep (RADAR-style) the baselines of Table 2", choices=tuple(SCORERS))
    t0: float = knob(0.5, "start time of the recon and onestep baselines", gt=0, lt=1)
    ode_steps: int = knob(10, "Euler steps of the recon baseline from t0 to 1", ge=1, le=1000)
    precision: str = knob("auto", "auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16", choices=("auto", "fp32", "bf16"))
    stride: int = knob(0, "tiled checkpoints: pixels between tiles, at most the tile; 0: half a tile", ge=0, le=4096)
    smooth: float = knob(0.0, "std, in pixels of the map, of a Gaussian that smooths the heatmap H before S (Eq. 4), "
                              "metrics, thresholds and saved maps; 0: none (the paper)", ge=0, le=1000)


# ----------------------------------------------------------------------------
# Tiles (train --tile N): an image larger than the model's input is covered by overlapping N x N tiles, the last
# of each row and column aligned to the border; every tile is scored as an image of its own and the tile maps are
# blended with a window that fades to ~0 at a tile's border, so the stitched map has the image's own size and no
# seam. A tile draws its paths from its place in the image, (top, left) as top * 2^32 + left: the tile at (0, 0)
# as a whole image, so an image of exactly one tile scores as untiled.
# Last, smooth_maps: the Gaussian smoothing of any map (--smooth), applied where the maps are made.

def tile_grid(H: int, W: int, N: int, stride: int) -> list:
    """(top, left) of the N x N tiles covering an H x W image, stride apart, edge tiles at the border."""
    tops, lefts = (sorted({*range(0, L - N + 1, stride), L - N}) for L in (H, W))
    return [(top, left) for top in tops for left in lefts]


def tile_window(N: int) -> torch.Tensor:
    """(N, N) blending weight sin^2(pi (u + 1/2) / N) sin^2(pi (v + 1/2) / N): positive, ~0 at the border."""
    w = torch.sin(math.pi * (torch.arange(N) + 0.5) / N) ** 2
    return w[:, None] * w[None, :]


def tile_cells(boxes, N: int, G: int) -> torch.Tensor:
    """For tiles (top, left) of H x W images, boxes [(top, left, H, W)]: the cell r G + c of a G x G grid
    over the image that holds the tile's centre, (n,)."""
    return torch.tensor([min(G - 1, (2 * top + N) * G // (2 * H)) * G + min(G - 1, (2 * left + N) * G // (2 * W))
                         for top, left, H, W in boxes])


def position_labels(labels, cells, G: int):
    """Labels of the embedding over category x grid cell: labels G^2 + cells (labels None: one
    category); labels as they are without cells (no position conditioning)."""
    if cells is None:
        return labels
    return cells if labels is None else labels * G * G + cells


@torch.no_grad()
def tiled_maps(fn, images, N: int, stride: int, per_call: int, progress=None, grid=0) -> list:
    """Maps of images larger than a tile: every N x N tile of every image ((3, H, W) each) goes
    through fn(tiles (n, 3, N, N), tile places, cells) -> (n, *, N, N) in flat batches of per_call
    tiles (cells: tile_cells on a grid x grid grid, None for grid 0), and the tile maps are stitched
    as sum(window * map) / sum(window) into (*, H, W) per image, stride from 1 to N (Detector.fit). Only
    per_call tiles are in flight at once: memory beyond the maps does not grow with the image."""
    window = tile_window(N)
    jobs = [(i, top, left) for i, x in enumerate(images) for top, left in tile_grid(*x.shape[-2:], N, stride)]
    acc, wsum, done = [None] * len(images), [torch.zeros(x.shape[-2:]) for x in images], 0  # done: images reported
    for c in range(0, len(jobs), per_call):
        chunk = jobs[c:c + per_call]
        tiles = torch.stack([images[i][:, top:top + N, left:left + N] for i, top, left in chunk])
        cells = tile_cells([(top, left, *images[i].shape[-2:]) for i, top, left in chunk], N, grid) if grid else None
        maps = fn(tiles, [top << 32 | left for _, top, left in chunk], cells).cpu()  # (n, *, N, N)
        for (i, top, left), m in zip(chunk, maps):
            if acc[i] is None:
                acc[i] = torch.zeros(*m.shape[:-2], *images[i].shape[-2:])
            acc[i][..., top:top + N, left:left + N] += window * m
            wsum[i][top:top + N, left:left + N] += window
        finished = chunk[-1][0] + (c + per_call >= len(jobs))  # images whose last tile is in
        if progress is not None and finished > done:
            progress(finished - done)
            done = finished
    return [a / w for a, w in zip(acc, wsum)]


def smooth_maps(heat, sigma: float):
    """Each map of heat ((N, H, W) tensor or list of (H, W) tensors) convolved with a Gaussian of std sigma map
    pixels (scipy.ndimage.gaussian_filter: truncated at 4 sigma, the border continued by its nearest pixel): the
    usual smoothing of anomaly maps, averaging out the pixel noise of native-resolution maps. sigma 0: heat as is."""
    if not sigma:
        return heat
    from scipy.ndimage import gaussian_filter
    out = [torch.from_numpy(gaussian_filter(h.cpu().numpy().astype(np.float32), sigma, mode="nearest")) for h in heat]
    return torch.stack(out) if torch.is_tensor(heat) else out


# ----------------------------------------------------------------------------
# Training loop: the optimiser of App. C.2 and a loop that survives interruption.

class StableAdamW(torch.optim.Optimizer):
    """AdamW with AMSGrad and per-tensor update clipping (StableAdamW, Wortsman et al. 2023):
    each tensor's step size is divided by max(1, RMS(g^2 / v_hat) / clip). One step is a few dozen
    torch._foreach_* calls over a group's tensors, not ~20 eager ops per tensor (~780 in the paper U-Net)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-4, clip=1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip=clip))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            g, states = [p.grad.float() for p in ps], [self.state[p] for p in ps]
            for state, gi in zip(states, g):
                if not state:
                    state.update(step=0, m=torch.zeros_like(gi), v=torch.zeros_like(gi), v_max=torch.zeros_like(gi))
                state["step"] += 1
            m, v, v_max = ([s[k] for s in states] for k in ("m", "v", "v_max"))
            torch._foreach_lerp_(m, g, 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, g, g, value=1 - b2)
            torch._foreach_maximum_(v_max, v)  # AMSGrad
            v_hat = torch._foreach_div(v_max, [1 - b2 ** s["step"] for s in states])
            ratio = torch._foreach_div(torch._foreach_mul(g, g), torch._foreach_clamp_min(v_hat, group["eps"] ** 2))
            rms = torch.stack([r.mean() for r in ratio]).sqrt()  # RMS(g^2 / v_hat) per tensor
            lr = group["lr"] / torch.clamp(rms / group["clip"], min=1.0)  # update-RMS clipping, (tensors,)
            torch._foreach_mul_(ps, list((1 - lr * group["weight_decay"]).unbind()))
            update = torch._foreach_div(m, [1 - b1 ** s["step"] for s in states])
            torch._foreach_div_(update, torch._foreach_add(torch._foreach_sqrt(v_hat), group["eps"]))
            torch._foreach_mul_(update, list((-lr).unbind()))
            torch._foreach_add_(ps, update)


RESUMABLE = ("epochs", "steps", "save_every", "save_epochs")  # how long and what to keep; not what is learnt


def resumed_config(ckpt: dict, cfg: TrainConfig, given=None) -> tuple:
    """(The run's own TrainConfig with the RESUMABLE fields of cfg that were given (given: see `given`;
    None: each field not at TrainConfig's default), the line naming each change, if any); --epochs alone
    trains that many. Any other field given that differs from the run's is refused, naming its flag."""
    saved = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["train_config"].items()})
    if given is None:
        given = {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != f.default}
    for name in sorted(set(given) - set(RESUMABLE)):
        if getattr(cfg, name) != getattr(saved, name):
            raise UserError(f"--{name.replace('_', '-')}: {getattr(cfg, name)} differs from the run's "
                            f"{getattr(saved, name)}; a resumed run keeps it (start a new run to change it)")
    new = replace(saved, **({"steps": None} if "epochs" in given and "steps" not in given else {}),
                  **{k: getattr(cfg, k) for k in RESUMABLE if k in given})
    changed = [f"--{k.replace('_', '-')} {getattr(saved, k)} -> {getattr(new, k)}" for k in RESUMABLE
               if getattr(new, k) != getattr(saved, k)]
    return new, [f"resuming with {', '.join(changed)}"] if changed else []


@dataclass
class Run:
    """What a training run holds between its steps; train_setup builds it."""

    cfg: TrainConfig  # the run's own (the checkpoint's, on resume), steps: the total
    data: Dataset  # the training images
    held: Dataset  # the calibration hold-out, never drawn into a batch
    conditional: bool
    model: UNet
    opt: StableAdamW
    ddp: torch.nn.Module  # the model as a step calls it: DDP-wrapped with several ranks, maybe compiled
    compiled: bool
    mean: torch.Tensor  # (3,) the normalisation of the training images
    std: torch.Tensor
    step: int  # steps done
    steps_per_epoch: int
    out: Path
    rank: int
    world: int
    device: torch.device
    trained_on: list  # see bound_record
    held_out: dict
    calibration: dict


def train(data, cfg: TrainConfig = TrainConfig(), out=None, device="auto", resume=False, log=note,
          compile=False, given=None) -> Path:
    """Train v_theta on `data` (a folder of categories or a Dataset of normal images) and write
    out/ckpt.pt (out: runs/<name of the data folder>); resume continues out's checkpoint.

    With cfg.calib_fraction > 0 a seeded part of each category is held out, never drawn into a
    batch, and scored at the end (K = T = 10) as the run's calibration set (see Calibration).
    Step s draws its batch, noise and dropout from (seed, s, rank) alone, so a run resumed from any
    checkpoint continues exactly as if it had never stopped (given: see resumed_config). Every step's
    loss, learning rate and speed go to out/train_log.csv, drawn at the end as out/loss.png."""
    out = Path(out or Path("runs") / Path(data.root if isinstance(data, Dataset) else data).resolve().name)
    flag = "--resume" if resume else "--out"
    check_paths({flag: out}, {"--data": None if isinstance(data, Dataset) else data})
    with run_lock(out, flag):  # held until training ends
        run = train_setup(data, cfg, out, pick_device(device, distributed()[2]), resume, log, compile, given)
        cpu_estimate(run, data, given, log)
        stop = []  # the signal that asks to stop: finish the step, save, exit
        old = {sig: signal.signal(sig, lambda signum, _: stop.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            train_loop(run, stop, log)
            calibrate_held_out(run)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        if run.rank == 0:
            plot_loss(out)
    if run.world > 1:
        dist.barrier()  # the other ranks wait for rank 0's last checkpoint before they exit
    return out / "ckpt.pt"


def cfm_step(model, opt, y, labels=None, generator=None) -> float:
    """One training step: the CFM loss of Eq. (1) on a batch, its gradient, one StableAdamW update."""
    with autocast(y.device):
        loss = cfm_loss(model, y, labels, generator)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def train_loop(run: Run, stop: list, log) -> None:
    """Steps run.step + 1 .. total: batch, seeds, cfm_step; then log, checkpoint, stop on a signal."""
    cfg, out, total, device, world = run.cfg, run.out, run.cfg.steps, run.device, run.world
    gen, step0, t_start, per_epoch = torch.Generator(device=device), run.step, time.time(), run.steps_per_epoch
    progress = Progress(total, "step", run.step, per=cfg.batch_size * world, log=log) if run.rank == 0 else None
    run.model.train()
    with open(out / "train_log.csv" if run.rank == 0 else os.devnull, "a", newline="") as log_file:
        rows = csv.writer(log_file)  # appended to the log train_setup left
        while run.step < total:
            step = run.step
            y, labels = train_batch(run, step)
            torch.manual_seed(seed_mix(cfg.seed, step, run.rank))  # dropout
            gen.manual_seed(seed_mix(cfg.seed, step, run.rank, 1))  # x0, t
            t0 = time.perf_counter()
            loss = cfm_step(run.ddp, run.opt, y, labels, gen)
            if run.compiled and step == step0 and run.rank == 0:
                log(f"torch.compile: the training step compiled in {time.perf_counter() - t0:.1f} s (its first run)")
            run.step = step = step + 1
            if not math.isfinite(loss):
                raise UserError(f"training diverged: non-finite loss ({loss}) at step {step}; {kept(out)}", status=1)
            wall = time.time() - t_start
            rows.writerow([step, f"{loss:.6g}", run.opt.param_groups[0]["lr"],
                           f"{(step - step0) * cfg.batch_size * world / wall:.2f}", f"{wall:.2f}"])
            log_file.flush()  # a row is readable (tail -f, a live plot) as soon as its step is done
            signum = stop[-1] if stop else 0
            if world > 1:  # every rank stops at the same step
                flag = torch.tensor([signum], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                signum = int(flag.item())
            if step % cfg.save_every == 0 or step == total or signum:
                save_run(run, out / "ckpt.pt")
            if step % per_epoch == 0 and step // per_epoch in cfg.save_epochs:
                save_run(run, out / f"ckpt_epoch{step // per_epoch}.pt")
            if signum:
                if run.rank == 0:
                    log(f"interrupted by {signal.Signals(signum).name} at step {step}/{total}; "
                        f"checkpoint saved, continue with: train --resume {out}")
                raise SystemExit(128 + signum)
            if progress:
                progress(1, f"epoch {step / per_epoch:.1f}  loss {loss:.4f}  ")


def cpu_estimate(run: Run, data, given, log) -> None:
    """On a CPU with a preset meant for GPUs, before the first step: the run's duration from one
    image's timed forward and backward and, where it is hours, the CPU preset's command into a
    folder of its own. The weights and the seeds of every step are untouched."""
    cfg, model, out = run.cfg, run.model, run.out
    if run.device.type != "cpu" or cfg.preset in CPU_RECIPES or run.rank != 0:
        return
    side = cfg.tile or cfg.image_size
    y = torch.zeros(1, 3, side, side).to(memory_format=torch.channels_last)
    labels = torch.zeros(1, dtype=torch.long) if model.label_emb is not None else None
    t0 = time.perf_counter()
    cfm_loss(model, y, labels, torch.Generator().manual_seed(0)).backward()
    per_image = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    hours = per_image * cfg.batch_size * run.world * (cfg.steps - run.step) / 3600
    line = (f"preset {cfg.preset} on a CPU: about {hours:,.1f} h for {cfg.steps - run.step:,} steps "
            f"({per_image:.2f} s per image, timed before the first step)")
    if hours >= 1:
        shown = {k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in (given or {}).items()
                 if k not in (*CPU_RECIPES["tiny"], "epochs", "preset") and v is not False}
        keep = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in shown.items())
        where = data.root if isinstance(data, Dataset) else data or run.data.root
        line += (f"; the CPU preset trains in minutes: python flow_mismatch.py train --data {where} --preset tiny "
                 f"{keep + ' ' if keep else ''}--out {free_folder(out, 'tiny')} (--preset small on more cores); "
                 f"continuing, Ctrl-C saves a checkpoint and stops")
    log(line)


def free_folder(out: Path, preset: str) -> Path:
    """A folder beside `out` that holds no run: OUT_PRESET, or OUT_PRESET2, 3, ..."""
    paths = (out.with_name(f"{out.name}_{preset}{i if i > 1 else ''}") for i in itertools.count(1))
    return next(path for path in paths if not (path / "ckpt.pt").exists())


def model_and_optimiser(cfg: TrainConfig, n_labels: int, ckpt, device) -> tuple:
    """The U-Net (seeded initial weights, or the checkpoint's) on `device` and its StableAdamW."""
    torch.manual_seed(cfg.seed)  # initial weights
    model = build_model(cfg.preset, max(1, n_labels) * cfg.tile_grid ** 2 if cfg.tile_grid else n_labels)
    opt = StableAdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, clip=cfg.update_rms_clip)
    model.to(device, memory_format=torch.channels_last)  # faster convolutions on CPU and GPU
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])  # its moments go to the parameters' device
    return model, opt


def run_summary(run: Run) -> str:
    """The line a run starts with: the model's size, its conditioning, the images and steps."""
    cfg, nparams, n = run.cfg, sum(p.numel() for p in run.model.parameters()), len(run.data.class_names)
    return (f"preset {cfg.preset}: {nparams:,} parameters ({nparams / 1e6:.1f} M); "
            f"{'class-conditional on ' + str(n) + ' categories' if run.conditional else 'unconditional'}; "
            f"{len(run.data)} images{f' ({len(run.held)} more held out for calibration)' * (len(run.held) > 0)}"
            f"{f', random {cfg.tile}x{cfg.tile} tiles at scale {cfg.tile_scale}' * (cfg.tile > 0)}, "
            f"{run.steps_per_epoch} step{'s' * (run.steps_per_epoch != 1)}/epoch, {cfg.steps} steps on "
            f"{run.device} x{run.world}")


def train_setup(data, cfg: TrainConfig, out: Path, device, resume, log, compile=False, given=None) -> Run:
    """The Run to start (not in a folder that holds a checkpoint) or continue (on the run's own data), its DDP
    wrapper under torch.compile with `compile` (every step has the same batch shape, so it compiles once);
    out/train_log.csv's rows past the checkpoint's step dropped."""
    rank, world, local_rank = distributed()
    ckpt, said = None, []  # said: what resuming changed, said once the data is checked too
    if resume:
        if not (out / "ckpt.pt").is_file():
            raise UserError(f"--resume: no checkpoint at {out / 'ckpt.pt'}")
        ckpt = load_checkpoint(out / "ckpt.pt")
        cfg, said = resumed_config(ckpt, cfg, given)
    elif (out / "ckpt.pt").exists():
        raise UserError(f"--out: {out} already holds a checkpoint; train into a folder of its own "
                        f"(--out {free_folder(out, cfg.preset)}), or continue that run with --resume {out}")
    if not isinstance(data, Dataset):  # a folder, or the resumed run's own
        data = load_train(data or ckpt.get("data"), *image_geometry(asdict(cfg)))
    if ckpt is not None and ckpt.get("data") and data.root != ckpt["data"]:
        raise UserError(f"--data: {data.root} is not the data of this run, {ckpt['data']}; a resumed run "
                        f"trains on what it began with (start a new run for other data)")
    if ckpt is not None and ckpt["class_names"] != data.class_names:
        raise UserError(f"--data: categories {data.class_names} differ from the run's {ckpt['class_names']}")
    data, held = split_calibration(data, cfg.calib_fraction, cfg.seed)
    conditional = len(data.class_names) > 1 and not cfg.pooled
    model, opt = model_and_optimiser(cfg, len(data.class_names) if conditional else 0, ckpt, device)
    mean, std = data.normalisation() if ckpt is None else (torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"]))
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None) \
        if world > 1 else model
    steps_per_epoch = max(1, len(data) // (cfg.batch_size * world))
    step = 0 if ckpt is None else ckpt["step"]
    run = Run(cfg=replace(cfg, steps=cfg.steps or cfg.epochs * steps_per_epoch), data=data, held=held,
              conditional=conditional, model=model, opt=opt, ddp=torch.compile(ddp, dynamic=False) if compile else ddp,
              compiled=compile, mean=mean, std=std, step=step, steps_per_epoch=steps_per_epoch, out=out, rank=rank,
              world=world, device=device, **bound_record(ckpt, data, held))
    if rank == 0:
        for line in said + [run_summary(run)]:
            log(line)
    path, flag = out / "train_log.csv", "--resume" if resume else "--out"
    names = ["train_log.csv", "loss.png", *(f"ckpt_epoch{e}.pt" for e in cfg.save_epochs)]
    check_ours(out, names, flag=flag)
    check_target(out / "ckpt.pt", flag)  # new: nothing there (checked above); resumed: replaced, never a link
    if rank == 0:  # the log up to the checkpoint's step, replaced atomically; then appended to
        record(out, names + ["ckpt.pt"])
        rows = [r for r in log_rows(path) if int(r[0]) <= step] if resume and path.is_file() else []
        with atomic_write(path, newline="") as f:
            csv.writer(f).writerows([LOG_HEAD] + rows)
    return run


def bound_record(ckpt, data: Dataset, held: Dataset) -> dict:
    """What a run records of its images: trained_on, the sha256 of every image it has trained on,
    which only grows over resumes; held_out, each category's hold-out by absolute path and sha256;
    calibration, the resumed checkpoint's (of older weights, scored again by calibrate_held_out)."""
    ckpt = ckpt or {}
    trained_on = list(ckpt.get("trained_on", []))
    seen = set(trained_on)
    trained_on += [h for h in image_hashes(data.images) if h not in seen]
    paths, hashes, labels = [str(Path(p).resolve()) for p in held.paths], image_hashes(held.images), held.labels.tolist()
    held_out = {name: dict(paths=[p for p, c in zip(paths, labels) if c == i],
                           sha256=[h for h, c in zip(hashes, labels) if c == i])
                for i, name in enumerate(data.class_names)}
    return dict(trained_on=trained_on, held_out=held_out, calibration=dict(ckpt.get("calibration") or {}))


def train_batch(run: Run, step: int) -> tuple:
    """Step `step`'s normalised images (B, 3, S, S) and labels: epoch e's order is drawn from (seed, e),
    this rank's slice of it from the step."""
    cfg, data, world, n = run.cfg, run.data, run.world, len(run.data)
    epoch, i = divmod(step, run.steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_mix(cfg.seed, epoch)))
    start = (i * world + run.rank) * cfg.batch_size
    idx = perm[torch.arange(start, start + cfg.batch_size) % n]
    if cfg.tile:  # an N x N crop of each image at a position drawn from (seed, step, rank), and its grid cell
        N, gen = cfg.tile, torch.Generator().manual_seed(seed_mix(cfg.seed, step, run.rank, 2))
        tiles, boxes = [], []
        for j in idx.tolist():
            H, W = data.images[j].shape[-2:]
            top, left = (int(torch.randint(L - N + 1, (), generator=gen)) for L in (H, W))
            tiles.append(data.images[j][:, top:top + N, left:left + N])
            boxes.append((top, left, H, W))
        x, cells = torch.stack(tiles), tile_cells(boxes, N, cfg.tile_grid) if cfg.tile_grid else None
    else:
        x, cells = data.images[idx], None
    labels = position_labels(data.labels[idx] if run.conditional else None, cells, cfg.tile_grid)
    return normalise(x.to(run.device), run.mean, run.std), None if labels is None else labels.to(run.device)


def kept(out: Path) -> str:
    return (f"the last good checkpoint, {out / 'ckpt.pt'}, is kept" if (out / "ckpt.pt").exists() else
            "no checkpoint had been written yet")


def save_run(run: Run, path: Path) -> None:
    """Rank 0 writes the run's checkpoint once its weights are checked finite (a refused write: see atomic_write)."""
    if run.rank != 0:
        return
    model, data = run.model, run.data
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise UserError(f"training diverged before step {run.step}: weights are not finite; {kept(run.out)}", status=1)
    save_checkpoint(path, dict(model=model.state_dict(), optimizer=run.opt.state_dict(),
                               model_config=asdict(model.cfg), train_config=asdict(run.cfg), mean=run.mean.tolist(),
                               std=run.std.tolist(), class_names=data.class_names, conditional=run.conditional,
                               step=run.step, data=data.root, trained_on=run.trained_on, held_out=run.held_out,
                               calibration=run.calibration))


def calibrate_held_out(run: Run) -> None:
    """Each calibration scored again on the final weights: the resumed checkpoint's, with its own
    images (checked by sha256) and rule, and for the other categories the hold-out with the default
    rule. One whose images changed, vanished or were trained on is dropped, with a warning."""
    data, held, trained = run.data, run.held, set(run.trained_on)
    sources = {name: run.held_out[name] for name in data.class_names if run.held_out[name]["paths"]}
    sources.update({name: cal for name, cal in run.calibration.items() if name in data.class_names})
    if not sources:
        return
    run.model.eval()
    run.calibration = {}
    known = dict(zip((str(Path(p).resolve()) for p in held.paths), held.images))
    for name, record in sources.items():
        try:
            images = bound_images(record, *image_geometry(asdict(run.cfg))[:2], known)
            if set(record["sha256"]) & trained:
                raise UserError("some of its images are now training images")
        except UserError as e:
            note(f"warning: the calibration of {name} is dropped ({e}); calibrate it again")
            continue
        c = data.class_names.index(name)
        run.calibration[name] = calibrate_on(
            run.model, Dataset(images, torch.full((len(images),), c), data.class_names, record["paths"]),
            replace(ScoreConfig(), **record.get("rule", {})), run.mean, run.std, run.device,
            c if run.conditional else None, run.step, run.cfg.tile, run.cfg.tile_grid)
    save_run(run, run.out / "ckpt.pt")


LOG_HEAD = ["step", "loss", "lr", "images_per_s", "wall_s"]  # the columns of train_log.csv


def log_rows(path: Path) -> list:
    """The rows of a train_log.csv that read as meant: five cells, a step >= 1 and four finite numbers.
    Any other line (a damaged or edited file, bytes that are not text) is dropped, with one warning."""
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for line in lines[1:]:
        with contextlib.suppress(csv.Error, ValueError, StopIteration):
            r = next(csv.reader([line]))
            if len(r) == 5 and int(r[0]) >= 1 and all(math.isfinite(float(x)) for x in r[1:]):
                rows.append(r)
    if len(rows) + 1 < len(lines) or (lines and lines[0] != ",".join(LOG_HEAD)):
        note(f"warning: {path}: {len(lines) - 1 - len(rows)} damaged line(s) dropped; the log keeps the "
             f"{len(rows)} rows that read as steps")
    return rows


def plot_loss(out: Path) -> None:
    """out/loss.png: the loss of out/train_log.csv against the step."""
    from matplotlib.figure import Figure

    rows = log_rows(out / "train_log.csv")
    ax = (fig := Figure(figsize=(6, 3.5), layout="constrained")).subplots()
    ax.plot([int(r[0]) for r in rows], [float(r[1]) for r in rows], lw=0.8)
    ax.set(xlabel="step", ylabel="CFM loss (Eq. 1)", yscale="log", title=out.name)
    with atomic_write(out / "loss.png", "wb") as f:
        fig.savefig(f, format="png", dpi=80)


# ----------------------------------------------------------------------------
# Checkpoints and output files: every file written atomically, one writer per folder (its lock), a
# command's outputs staged and swapped in together, checkpoints read as plain data.

MANIFEST = ".flow-mismatch"  # in each output folder: the names of the entries this program wrote there


def special(path):
    """`path` in words if it is a link, FIFO, socket or device (never written through or over); else None."""
    try:
        kind = stat.S_IFMT(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return {stat.S_IFLNK: "a symbolic link", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
            stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}.get(kind)


def check_target(path, flag=None, refusing="write through or over it") -> None:
    """A file we are about to write: nothing yet, or a regular file (never followed if a link)."""
    if what := special(path) or ("a folder" if os.path.isdir(path) else None):
        raise UserError(f"{flag + ': ' if flag else ''}{path} is {what}; refusing to {refusing}")


def disk_error(path: Path, e: Exception) -> UserError:
    """A write the disk refused (full, read-only, no permission, name too long) as one line naming
    the file and what was kept; exit status 1."""
    why = getattr(e, "strerror", None) or str(e)
    kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written there"
    return UserError(f"{path}: could not be written ({why}); {kept}", status=1)


@contextlib.contextmanager
def atomic_write(path, mode="w", **kw):
    """Open a temp file beside `path` for writing; when the block ends, fsync it and rename it over `path`.
    An error, Ctrl-C or kill at any moment leaves the old file (or none) intact, never a part. Only a
    regular file is replaced (check_target); the temp name stays short; a refused write is disk_error."""
    path = Path(path)
    check_target(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:40]}.", suffix=".tmp")
    except OSError as e:
        raise disk_error(path, e) from None
    try:
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> the mode any new file of the user gets
        check_target(path)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise disk_error(path, e) from None
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: the rename itself survives a crash
        dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)


def write_text(path, text: str) -> None:
    with atomic_write(path, encoding="utf-8", errors="surrogateescape") as f:  # any locale, any name
        f.write(text)


def save_image(path: Path, im) -> None:
    """A PIL image or an array (uint8; float32 for TIFF) to `path`, atomically, as its suffix names (PNG, TIFF)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        (im if isinstance(im, Image.Image) else Image.fromarray(im)).save(f, format=path.suffix[1:].upper())


def try_lock(f) -> bool:
    """An exclusive OS lock on the open file f, without waiting: False if another process holds it.
    fcntl.flock where it exists (POSIX), msvcrt.locking of the first byte on Windows; the OS drops
    it when the process dies, kill -9 included."""
    try:
        import fcntl
    except ImportError:
        import msvcrt

        f.seek(0)
        with contextlib.suppress(OSError):
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        return False
    with contextlib.suppress(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    return False


def open_lock(path: Path, flag):
    """The lock file, opened for reading and writing without following a link (O_NOFOLLOW): only a
    regular file of one name (no hard link to another file) that is empty or names a holder as
    run_lock writes it; anything else is refused by name, untouched."""
    refusing = "lock through it (remove it if it is not yours)"
    check_target(path, flag, refusing)
    nofollow = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO opens without waiting
    f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | nofollow, 0o666), "r+")
    st = os.fstat(f.fileno())
    what = "not a regular file" if not stat.S_ISREG(st.st_mode) else "a hard link" if st.st_nlink > 1 else None
    if not what:
        try:
            words = f.read(200).split()
            what = None if not words or (len(words) == 2 and words[0].isdigit()) else "not a lock of ours"
        except ValueError:  # not text
            what = "not a lock of ours"
        except OSError:  # Windows: a holder's locked byte cannot be read
            pass
    if what:
        f.close()
        raise UserError(f"{flag}: {path} is {what}; refusing to {refusing}")
    return f


@contextlib.contextmanager
def run_lock(out: Path, flag="--out", command="train", wait=False):
    """One writer per folder (`train`, `calibrate` of a run folder; `test`, `score` of an output folder):
    an exclusive OS lock (try_lock) on OUT/.lock, naming the holder's pid and command, while the block
    runs. Busy: an error naming the folder and holder, or with wait, one line and a wait. The folder is
    checked first (check_out_dir); one made here and left without an output is removed again."""
    check_out_dir(out, flag)
    if int(os.environ.get("RANK", 0)) != 0:  # torchrun: rank 0 holds it for the job
        yield
        return
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / ".lock"
    f = open_lock(path, flag)
    said = False
    while not try_lock(f):
        f.seek(0)
        try:
            pid, *what = f.read().split() or ["unknown"]
        except OSError:  # Windows: the holder's locked byte cannot be read
            pid, what = "unknown", []
        holder = f"{what[0] if what else 'run'} (pid {pid})"
        if not wait:
            f.close()
            raise UserError(f"{flag}: {out} is in use by another {holder}; wait for it or choose another folder")
        if not said:
            note(f"waiting for {holder} to finish with {out}")
            said = True
        time.sleep(0.2)
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} {command}\n")
        f.flush()
    except OSError as e:
        f.close()
        raise disk_error(path, e) from None
    try:
        yield
    finally:
        f.close()
        if made and set(os.listdir(out)) <= {".lock", MANIFEST}:  # nothing was written
            for name in (".lock", MANIFEST):
                (out / name).unlink(missing_ok=True)
            out.rmdir()


def check_out_dir(out: Path, flag="--out") -> None:
    """Before any work: `out` is a folder, or can be made one, and this user may write in it."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"{flag}: {out} exists and is not a folder")
    have = Path(os.path.abspath(out))
    while not os.path.exists(have):
        have = have.parent
    if not have.is_dir():
        raise UserError(f"{flag}: {out} cannot be made: {have} is a file")
    if not os.access(have, os.W_OK | os.X_OK):
        raise UserError(f"{flag}: {out} cannot be written: no write permission in {have} (or a read-only disk)")


STAGING = (".staging", "INCOMPLETE")


@contextlib.contextmanager
def staged(out: Path, stale=()):
    """A rerun's outputs replace OUT's as a whole: written into the folder this yields (named as in OUT),
    they are recorded in OUT's MANIFEST and moved in together when the block ends; the outputs in `stale`
    (an earlier run's, not written now) are removed if ours. An error or interrupt while writing leaves
    the previous run as it was; one during the moves (renames, milliseconds) leaves OUT/INCOMPLETE naming
    what is missing. Only MANIFEST entries are touched; callers check_ours their names before any work."""
    check_ours(out, STAGING)
    record(out, STAGING)
    tmp = out / ".staging"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    tmp.mkdir(parents=True)
    try:
        yield tmp
        names = sorted(os.listdir(tmp))
        check_ours(out, names)
        stale = [n for n in sorted(set(stale) & written_here(out)) if n not in names and not special(out / n)]
        record(out, names)
        write_text(out / "INCOMPLETE", f"an interrupted run was replacing {', '.join(names)} here; some may be missing\n")
        trash = tmp / ".old"
        trash.mkdir()
        for name in [*names, *stale]:
            if os.path.lexists(out / name):
                os.replace(out / name, trash / name)
        try:
            for name in names:
                os.replace(tmp / name, out / name)
        except BaseException:  # each name not yet moved in: the old ones are all in the trash
            write_text(out / "INCOMPLETE", f"missing: {', '.join(n for n in names if not os.path.lexists(out / n))} "
                                           f"(an interrupted run); run it again\n")
            raise
        (out / "INCOMPLETE").unlink()
        record(out, drop=stale)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(path: Path, state: dict) -> None:
    with atomic_write(path, "wb") as f:
        try:
            torch.save(state, f)
        except RuntimeError as e:  # how torch's zip writer reports a write the disk refused
            raise OSError(f"torch.save failed: {str(e).split('] . ')[-1][:60]}; is the disk full?") from None


def written_here(folder: Path) -> set:
    """The names of the entries this program recorded as its own in `folder` (its MANIFEST)."""
    path = Path(folder) / MANIFEST
    check_target(path)
    try:
        names = json.loads(path.read_text())
        why = None if isinstance(names, list) and all(isinstance(n, str) for n in names) else "not a list of names"
    except FileNotFoundError:
        return set()
    except (OSError, ValueError) as e:
        why = type(e).__name__
    if why:
        raise UserError(f"{path}: not a readable record of what flow_mismatch.py wrote here ({why}); "
                        f"remove it if the folder is not ours")
    return set(names)


def check_ours(folder: Path, names, flag="--out") -> None:
    """Before anything is written: each of `names` that `folder` already holds is an entry this
    program wrote there (listed in its MANIFEST) and a plain file or folder; else one line naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    ours = written_here(folder)
    for name in names:
        if what := special(folder / name):
            raise UserError(f"{flag}: {folder / name} is {what}; refusing to write through or over it")
        if os.path.lexists(folder / name) and name not in ours:
            raise UserError(f"{flag}: {folder / name} was not written by flow_mismatch.py (it is not in "
                            f"{folder / MANIFEST}); move it away or choose another folder")


def record(folder: Path, add=(), drop=()) -> None:
    """`folder`'s MANIFEST, atomically: what it lists, with `add` and without `drop`."""
    ours = written_here(folder)
    names = (ours | set(add)) - set(drop)
    if names != ours or not (Path(folder) / MANIFEST).exists():
        write_text(Path(folder) / MANIFEST, json.dumps(sorted(names)) + "\n")


@contextlib.contextmanager
def own_files(folder: Path, names, flag="--out", command="write"):
    """For writing the files `names` into `folder`, a folder the user may share with us: its lock
    held, each name new or this program's own (check_ours) and recorded before the block."""
    with run_lock(folder, flag, command):
        check_ours(folder, names, flag)
        record(folder, names)
        yield


def within(path, folder) -> bool:
    """`path` is `folder` or inside it, as the file system sees it (links, mounts, letter case)."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    if p == f or f in p.parents:
        return True
    with contextlib.suppress(OSError):  # no folder: nothing is inside it
        target = os.stat(f)
        for q in (p, *p.parents):
            with contextlib.suppress(OSError):
                if os.path.samestat(os.stat(q), target):
                    return True
    return False


def check_paths(outputs: dict, inputs: dict) -> None:
    """Before any work: no output ({flag: path}) is an input ({flag: path}: a folder read, or a file)
    or inside one, and no two outputs are the same or one inside the other. None: not given."""
    outputs = {k: Path(v) for k, v in outputs.items() if isinstance(v, (str, os.PathLike))}
    inputs = {k: Path(v) for k, v in inputs.items() if isinstance(v, (str, os.PathLike))}
    for (flag, out), (source, src) in itertools.product(outputs.items(), inputs.items()):
        if within(out, src):
            raise UserError(f"{flag}: {out} is {'' if within(src, out) else 'inside '}the input {source} {src}; "
                            f"write the outputs elsewhere")
    for (flag, a), (other, b) in itertools.combinations(outputs.items(), 2):
        if within(a, b) or within(b, a):
            raise UserError(f"{other}: {b} and {flag} {a} overlap; give each its own folder")


# What a checkpoint of ours holds: key -> the type its value must have. Loading uses
# weights_only=True, so unpickling builds only tensors and plain containers and never runs code.
CKPT_KEYS = {"model": dict, "model_config": dict, "train_config": dict, "mean": list, "std": list,
             "class_names": list, "conditional": bool, "step": int}
TRAIN_ADDED = ("tile", "tile_scale", "tile_grid")  # TrainConfig fields younger than some checkpoints: those get the defaults
CKPT_OPTIONAL = {"optimizer": dict, "data": (str, type(None)), "trained_on": list, "held_out": dict,
                 "calibration": dict}


def load_checkpoint(path) -> dict:
    """Read a checkpoint without executing anything in it, and check it as data before it is used: the
    archive's CRCs, every key we rely on, every tensor and number finite, each stored config value as
    its flag is checked, the calibration records. Anything wrong is one line naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ckpt: no checkpoint at {path}")
    try:
        damaged = None
        if zipfile.is_zipfile(path):  # torch.load does not verify the archive's CRCs
            with zipfile.ZipFile(path) as z:
                damaged = z.testzip()
        ckpt = torch.load(path, map_location="cpu", weights_only=True) if damaged is None else None
    except pickle.UnpicklingError:
        raise UserError(f"--ckpt: {path} refused: it holds objects other than tensors and plain data "
                        f"(loading it could run code)")
    except Exception as e:
        raise UserError(f"--ckpt: {path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:80]})")
    if damaged is not None:
        raise UserError(f"--ckpt: {path} is damaged: its part {damaged} fails the archive's CRC check")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise UserError(f"--ckpt: {path} is not a flow-mismatch checkpoint")
    for key, kind in (*CKPT_KEYS.items(), *CKPT_OPTIONAL.items()):
        if key not in ckpt:
            if key in CKPT_KEYS:
                raise UserError(f"--ckpt: {path} lacks the key '{key}'")
        elif not isinstance(ckpt[key], kind) or (kind is int and isinstance(ckpt[key], bool)):
            raise UserError(f"--ckpt: {path}: key '{key}' holds a {type(ckpt[key]).__name__}, "
                            f"not a {getattr(kind, '__name__', 'str')}")
    ckpt["train_config"] = {**{f: getattr(TrainConfig, f) for f in TRAIN_ADDED}, **ckpt["train_config"]}
    for key, cls in (("model_config", ModelConfig), ("train_config", TrainConfig)):
        if wrong := sorted(set(ckpt[key]) ^ {f.name for f in fields(cls)}):
            raise UserError(f"--ckpt: {path}: '{key}' has other fields than ours ({', '.join(wrong[:4])})")
    check_checkpoint(ckpt, f"--ckpt: {path}")
    return ckpt


def check_checkpoint(ckpt: dict, at: str) -> None:
    """The values of a checkpoint whose keys load_checkpoint checked; at: the error's prefix."""
    for key, value in tensors_and_numbers(ckpt):
        if not (torch.isfinite(value).all() if torch.is_tensor(value) else math.isfinite(value)):
            raise UserError(f"{at}: key '{key}' holds non-finite values (NaN or infinity)")
    if not all(torch.is_tensor(v) for v in ckpt["model"].values()):
        raise UserError(f"{at}: 'model' holds something other than tensors")
    if len(ckpt["mean"]) != 3 or len(ckpt["std"]) != 3 or not all(
            isinstance(x, float) for x in ckpt["mean"] + ckpt["std"]) or min(ckpt["std"]) <= 0:
        raise UserError(f"{at}: 'mean' and 'std' must be three finite floats each (std > 0)")
    names = ckpt["class_names"]
    if not names or not all(isinstance(c, str) and c for c in names) or len(set(names)) < len(names):
        raise UserError(f"{at}: 'class_names' must be a non-empty list of distinct names")
    if ckpt["step"] < 0 or not all(isinstance(h, str) for h in ckpt.get("trained_on", [])):
        raise UserError(f"{at}: key '{'step' if ckpt['step'] < 0 else 'trained_on'}' holds an impossible value")
    flags = {flag_of(f): f.name for f in fields(TrainConfig)}
    try:  # its __post_init__ checks each field as its flag is checked, then the checks between fields
        TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["train_config"].items()})
    except UserError as e:
        raise UserError(f"{at}: key 'train_config' field '{flags.get(e.flag, e.flag)}': {e.message}")
    check_model_config(ckpt, at)
    for name, record in ckpt.get("held_out", {}).items():
        paths, hashes = (record.get(k) if isinstance(record, dict) else None for k in ("paths", "sha256"))
        if not (isinstance(paths, list) and isinstance(hashes, list) and len(paths) == len(hashes) and
                all(isinstance(x, str) for x in paths + hashes)):
            raise UserError(f"{at}: key 'held_out.{name}' is not a record of paths and their sha256")
    for name, record in ckpt.get("calibration", {}).items():
        check_calibration(record, f"{at}: key 'calibration.{name}")


def tensors_and_numbers(value, key=""):
    """(dotted key, value) of every tensor of a floating type and every float within value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from tensors_and_numbers(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from tensors_and_numbers(v, f"{key}[{i}]")
    elif (torch.is_tensor(value) and value.is_floating_point()) or isinstance(value, float):
        yield key, value


MODEL_SHAPE = dict(base_channels=(1, 4096), num_res_blocks=(1, 64), head_channels=(1, 4096), norm_groups=(1, 4096),
                   in_channels=(3, 3), num_classes=(0, 2**20))  # ranges a stored U-Net's int fields must keep


def check_model_config(ckpt: dict, at: str) -> None:
    """model_config describes a U-Net of ours for 3-channel images of the stored size, with one label
    per category (times the tile grid's cells) if conditional."""
    mc, tc = ckpt["model_config"], ckpt["train_config"]
    for key, (lo, hi) in MODEL_SHAPE.items():
        if type(mc[key]) is not int or not lo <= mc[key] <= hi:
            raise UserError(f"{at}: key 'model_config' field '{key}': {mc[key]!r} is not an integer from {lo} to {hi}")
    for key in ("channel_mult", "attention_ds"):
        v = mc[key]
        if not (isinstance(v, (list, tuple)) and 1 <= len(v) <= 8 and all(type(x) is int and 1 <= x <= 64 for x in v)):
            raise UserError(f"{at}: key 'model_config' field '{key}': {v!r} is not a list of 1 to 8 integers "
                            f"from 1 to 64")
    if not isinstance(mc["dropout"], (int, float)) or isinstance(mc["dropout"], bool) or not 0 <= mc["dropout"] < 1:
        raise UserError(f"{at}: key 'model_config' field 'dropout': {mc['dropout']!r} is not in [0, 1)")
    factor, size = 2 ** (len(mc["channel_mult"]) - 1), tc["tile"] or tc["image_size"]
    if size % factor:
        raise UserError(f"{at}: key 'train_config' field '{'tile' if tc['tile'] else 'image_size'}': {size} is not a "
                        f"multiple of {factor}, the total downsampling of its U-Net")
    n = len(ckpt["class_names"]) if ckpt["conditional"] else 0
    labels = max(1, n) * tc["tile_grid"] ** 2 if tc["tile_grid"] else n
    if mc["num_classes"] != labels:
        raise UserError(f"{at}: key 'model_config' field 'num_classes': {mc['num_classes']} labels, but its "
                        f"categories, 'conditional' and tile grid need {labels}")


def model_from_checkpoint(ckpt: dict, path="") -> UNet:
    try:
        cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["model_config"].items()})
        model = UNet(cfg)
    except Exception as e:  # a field of the right name but an impossible value
        raise UserError(f"--ckpt: {path}: 'model_config' does not describe a U-Net of ours ({type(e).__name__})")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise UserError(f"--ckpt: {path}: 'model' does not match its own model config (other preset or class count?)")
    return model


# ----------------------------------------------------------------------------
# Devices and DDP (torchrun).

def distributed() -> tuple[int, int, int]:
    """(rank, world, local_rank); initialises the process group under torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device: unknown device {name!r} (auto, cpu or cuda)")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: cuda requested but no GPU is visible")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = True  # App. C.2: TF32
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda", local_rank)


def inference_model(model: UNet, device, compile=False, channels_last=None):
    """Eval mode on `device`; with `compile`, the Compiled U-Net. Layout (None: by device): channels_last
    on a CPU (1.16-1.28x), NCHW on a GPU (1.24x on an H200, where channels_last scored slower; BENCHMARKS.md)."""
    if channels_last is None:
        channels_last = torch.device(device).type == "cpu"
    model = model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format).eval()
    return Compiled(model) if compile else model


# ----------------------------------------------------------------------------
# Metrics: the seven numbers of Table 1, defined as in the MVTec-AD evaluation.

METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
MEAN = "mean/"  # the key of the mean over categories: no folder, so no category, can be named so


def f1_max(labels, scores) -> float:
    """Best F1 over all thresholds."""
    from sklearn.metrics import precision_recall_curve

    p, r, _ = precision_recall_curve(labels, scores)
    return float(np.max(2 * p * r / np.clip(p + r, 1e-12, None)))


def pro_curve(masks, heat):
    """(FPR, PRO) at every distinct threshold of heat, from (0, 0); None without a region or a normal
    pixel. masks, heat: (N, H, W) arrays or lists of 2-D arrays of any sizes. Regions are the 8-connected
    components of each ground-truth mask; at every threshold PRO is the mean over regions of the fraction
    of the region above it, FPR the fraction of normal pixels above it."""
    from scipy.ndimage import label

    region, n_regions = [], 0  # 1 / |region| on anomalous pixels
    for mask in masks:
        mask = np.asarray(mask, bool)
        comp, n = label(mask, structure=np.ones((3, 3)))
        inverse_size = 1.0 / np.maximum(np.bincount(comp.ravel()), 1)  # per component; 0: the normal pixels
        region.append(np.where(mask, inverse_size[comp], 0.0).ravel())
        n_regions += n
    region = np.concatenate(region)
    normal = region == 0
    if n_regions == 0 or not normal.any():
        return None
    heat = np.concatenate([np.ravel(h) for h in heat]).astype(np.float64)
    order = np.argsort(-heat, kind="stable")
    s = heat[order]
    fpr = np.cumsum(normal[order]) / normal.sum()
    pro = np.cumsum(region[order]) / n_regions
    last = np.r_[s[1:] != s[:-1], True]  # one point per distinct threshold
    return np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]


def aupro(masks, heat, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve (pro_curve) up to FPR 0.3, divided by 0.3; the
    curve is cut at FPR = 0.3 by linear interpolation."""
    if (curve := pro_curve(masks, heat)) is None:
        return float("nan")
    fpr, pro = curve
    cut = np.searchsorted(fpr, fpr_limit, side="right")
    x, yv = fpr[:cut], pro[:cut]
    if cut < len(fpr) and x[-1] < fpr_limit:
        y_lim = np.interp(fpr_limit, fpr[cut - 1:cut + 1], pro[cut - 1:cut + 1])
        x, yv = np.r_[x, fpr_limit], np.r_[yv, y_lim]
    return float(np.trapezoid(yv, x) / fpr_limit)


def compute_metrics(labels: np.ndarray, scores: np.ndarray, masks, heat) -> dict:
    """Image metrics from the scores S; pixel metrics over every test pixel, normal images included
    (masks, heat: as pro_curve's). A metric that cannot be computed (one class; masks None: no ground truth) is None."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    out = dict.fromkeys(METRICS)
    if 0 < labels.sum() < len(labels):
        out.update(image_auroc=roc_auc_score(labels, scores), image_ap=average_precision_score(labels, scores),
                   image_f1max=f1_max(labels, scores))
    if masks is not None:
        gt = np.concatenate([np.ravel(m) for m in masks]).astype(bool)
        px = np.concatenate([np.ravel(h) for h in heat])
        if 0 < gt.sum() < gt.size:
            out.update(pixel_auroc=roc_auc_score(gt, px), pixel_ap=average_precision_score(gt, px),
                       pixel_f1max=f1_max(gt, px), pixel_aupro=aupro(masks, heat))
    return {k: None if v is None or not math.isfinite(v) else float(v) for k, v in out.items()}


# ----------------------------------------------------------------------------
# Data: the benchmark layouts as downloaded, read in place and told apart per category folder,
# resized to --image-size. A root may hold categories of different layouts (the table of layouts
# is below, each row beside the recogniser that reads it).

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # the only decoders Pillow may use, whatever a file's extension
MAX_PIXELS = 64 * 10**6  # the pixel budget: 64 megapixels (192 MB as 8-bit RGB); --max-pixels raises it
OPENING = threading.Lock()  # held while Pillow reads a header with its own size check set aside
NORMAL = ("good", "ok")  # the normal folders' names (BTAD: ok)


@dataclass
class Dataset:
    images: torch.Tensor  # (N, 3, S, S) uint8; for tiles, at native size: (N, 3, H, W), or a list of (3, H, W) if sizes differ
    labels: torch.Tensor  # (N,) category index into class_names
    class_names: list
    paths: list
    anomalous: np.ndarray = None  # (N,) 0/1, test sets only
    masks: np.ndarray = None  # (N, S, S) uint8, test sets only
    root: str = ""
    mask_files: list = None  # (N,) lists of mask files ([] for normal images); None: no ground truth
    sizes: list = None  # (N,) original (w, h) of the images, test sets only

    def __len__(self):
        return len(self.paths)

    def normalisation(self):
        """Per-channel mean and std of the training images in [0, 1] (Sec. 5.1), over all their
        pixels: for tiles, over the native-size images the tiles are cut from."""
        n = sum(im[0].numel() for im in self.images)  # image by image: no float copy of the whole set
        m = sum(im.double().sum((1, 2)) for im in self.images) / (255 * n)
        var = sum(((im.double() / 255 - m.view(-1, 1, 1)) ** 2).sum((1, 2)) for im in self.images) / (n - 1)
        return m.float(), var.sqrt().clamp_min(1e-3).float()

    def subset(self, idx):
        """The images idx of a training set (no anomaly labels or masks)."""
        images = self.images[idx] if torch.is_tensor(self.images) else [self.images[i] for i in idx]
        return Dataset(images, self.labels[idx], self.class_names, [self.paths[i] for i in idx], root=self.root)


@dataclass
class Category:
    """The files of one category, whatever its layout."""

    name: str
    train_dir: Path  # where its normal training images are
    test_dir: Path
    train: list  # image files
    test: list  # (image file, 0/1 anomalous, [mask files]): several masks are united, none for normal images
    has_masks: bool = True  # False: no ground truth at all, so no pixel metrics


def hidden(p: Path) -> bool:
    """Never data (the README lists them): dot-files (._* AppleDouble, .ipynb_checkpoints) and __MACOSX."""
    return p.name.startswith(".") or p.name == "__MACOSX"


def image_files(folder: Path) -> list:
    """A folder's regular files (or links to one) with an image extension; hidden entries ignored, any
    other entry (a sub-folder, another file, a FIFO, socket or device) named in one warning, unopened."""
    files, other = [], []
    for p in sorted(folder.iterdir()):
        if not hidden(p):
            (files if p.suffix.lower() in IMAGE_EXTS and p.is_file() else other).append(p)
    if other:
        names = ", ".join(p.name + "/" * p.is_dir() for p in other[:5])
        names += f" and {len(other) - 5} more" * (len(other) > 5)
        note(f"warning: {folder}: skipped {len(other)} entr{'ies' if len(other) > 1 else 'y'} that "
             f"{'are' if len(other) > 1 else 'is'} not an image file: {names}")
    return files


def subfolders(folder: Path) -> list:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not hidden(d)) if folder.is_dir() else []


def read_image(path, size, mode="RGB", scale=1.0):
    """An image file (or PIL image) -> (array (size, size[, 3]) uint8, original (w, h)); size None keeps
    the original size, rescaled by `scale` (to round(scale w) x round(scale h)).
    mode "RGB": any mode and bit depth Pillow opens becomes 8-bit RGB with its range kept (16-bit
    values / 257, floats in [0, 1] x 255, floats of another range min-max with a warning).
    mode "mask": 1 where the stored value is non-zero (palette index, label id, 16-bit value, any
    colour channel; alpha is ignored), as the MVTec-AD evaluation reads masks."""
    from PIL import Image

    try:
        with open_image(path) if isinstance(path, (str, os.PathLike)) else contextlib.nullcontext(path) as im:
            im.load()
            original = im.size
            if mode == "mask":
                a = np.asarray(im)
                a = a[..., :-1] if im.mode in ("LA", "La", "PA", "RGBA", "RGBa") else a
                im = Image.fromarray(a.reshape(a.shape[0], a.shape[1], -1).any(-1).astype(np.uint8))
            elif im.mode.startswith("I"):  # 16- and 32-bit integer images
                im = Image.fromarray((np.asarray(im, np.float64) / 257).clip(0, 255).round().astype(np.uint8))
            elif im.mode == "F":  # 32-bit float: [0, 1] scaled to 8 bits, any other range min-max, said
                a = np.asarray(im, np.float64)
                finite = a[np.isfinite(a)]
                lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
                if lo < 0 or hi > 1 or finite.size < a.size:
                    note(f"warning: {path}: float image with values in [{lo:.4g}, {hi:.4g}]"
                         f"{' and non-finite ones' * (finite.size < a.size)}, not [0, 1]; mapped min-max to 0-255")
                    a = (np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo) - lo) / max(hi - lo, 1e-12)
                im = Image.fromarray((a.clip(0, 1) * 255).round().astype(np.uint8))
            if mode == "RGB":
                im = im.convert("RGB")
            to = (size, size) if size is not None else (round(scale * im.width), round(scale * im.height))
            return np.asarray(im.resize(to, Image.BILINEAR if mode == "RGB" else Image.NEAREST)), original
    except UserError:
        raise
    except Exception as e:  # PIL raises many kinds on broken files (OSError, SyntaxError, ...)
        raise UserError(f"{path}: unreadable or corrupt image ({str(e)[:80]})")


def open_image(path):
    """A regular file opened as one of IMAGE_FORMATS, by its content, and only if the size it declares
    keeps the pixel budget MAX_PIXELS: checked before anything is decoded. No other decoder (nor
    the external program one would call) is ever reached. Pillow's own decompression-bomb check
    is replaced by ours (its global is set aside under a lock while a header is read)."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():  # a FIFO or device is never opened (opening a FIFO waits for a writer)
        raise UserError(f"{path}: not a regular file (a folder, FIFO, socket or device)")
    with OPENING:
        pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            im = Image.open(path, formats=IMAGE_FORMATS)
        except UnidentifiedImageError:
            raise UserError(f"{path}: not a supported image (PNG, JPEG, BMP or TIFF by its content)")
        finally:
            Image.MAX_IMAGE_PIXELS = pillow_limit
    if im.width * im.height > MAX_PIXELS:
        im.close()
        raise UserError(f"{path}: declares {im.width}x{im.height} = {im.width * im.height / 1e6:.1f} megapixels, "
                        f"over the pixel budget of {MAX_PIXELS / 1e6:g} megapixels (raise it with --max-pixels)")
    return im


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float, per channel (x / 255 - mean) / std with the training set's mean and std."""
    return (images.float() / 255 - mean.to(images.device).view(1, -1, 1, 1)) / std.to(images.device).view(1, -1, 1, 1)


def uint8_batch(arrays) -> torch.Tensor:
    """(H, W, 3) uint8 arrays -> (N, 3, H, W) uint8, or a list of (3, H, W) if their sizes differ."""
    if len({a.shape for a in arrays}) == 1:
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return [torch.tensor(a).permute(2, 0, 1).contiguous() for a in arrays]


def match_masks(images: list, folder: Path) -> list:
    """Each image's masks in a ground-truth folder, named <name>.ext, <name>_mask.ext (_mask in any case) or
    in a folder <name>/ of several masks (MVTec LOCO): of its exact name; else of its name up to case, when
    that is the only such mask and no other image has its name exactly; else an error."""
    index, by_name, out = {}, {f.stem: f for f in images}, []  # index: {image name: [mask files]}
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if hidden(p):
            continue
        if p.is_dir():
            index[p.name] = image_files(p)
        elif p.suffix.lower() in IMAGE_EXTS:
            index.setdefault(p.stem[:-5] if p.stem.lower().endswith("_mask") else p.stem, [p])

    def first(name):  # a mask of this name, or its folder when that is empty (MVTec LOCO)
        return (index[name] or [folder / name])[0]

    for f in images:
        near = [k for k in index if k.lower() == f.stem.lower()]
        if f.stem in index:
            out.append(index[f.stem])
        elif len(near) > 1:
            raise UserError(f"{f}: no mask of exactly its name, and two up to case: {first(near[0])}, "
                            f"{first(near[1])}")
        elif near and near[0] in by_name:
            raise UserError(f"{f}: no mask of exactly its name; {first(near[0])} is the mask of "
                            f"{by_name[near[0]]}, not of both")
        else:
            out.append(index[near[0]] if near else [])
    if missing := next((f for f, ms in zip(images, out) if not ms), None):
        raise UserError(f"{missing}: no mask at {folder / (missing.stem + '_mask.png')}")
    return out


# The layouts, each a recogniser beside its row: a category folder -> its (train, test) folders if it
# looks like that layout, else None. A new layout is one more in LAYOUTS. Ground truth, in any of
# them, is <cat>/ground_truth or <test>/ground_truth, its masks named as match_masks reads them.

#   MVTec AD 2          <cat>/test_public/{good,bad}  <cat>/test_public/ground_truth/bad/<name>_mask.png
def mvtec_ad2(cat: Path):
    if (cat / "test_public").is_dir() and not (cat / "test").is_dir():  # validation/, test_private/: not test data
        return cat / "train" / "good", cat / "test_public"


#   BTAD                <cat>/train/ok  <cat>/test/{ok,ko}  <cat>/ground_truth/ko/<name>.png|bmp
def btad(cat: Path):
    if (cat / "train" / "ok").is_dir() and not (cat / "train" / "good").is_dir():
        return cat / "train" / "ok", cat / "test"


#   MVTec-AD, MPDD      <cat>/train/good  <cat>/test/<defect or good>  <cat>/ground_truth/<defect>/<name>_mask.png
#   VisA (1cls split)   <cat>/test/{good,bad}  <cat>/ground_truth/bad/<name>.png
#   MVTec LOCO          <cat>/ground_truth/<defect>/<name>/*.png: several masks per image, their union
#   a folder of one's own: train/good and labelled test folders, no ground_truth (no pixel metrics)
def mvtec(cat: Path):
    if (cat / "train").is_dir() or (cat / "test").is_dir():
        return cat / "train" / "good", cat / "test"


LAYOUTS = [mvtec_ad2, btad, mvtec]  # in order: the first that recognises a folder reads it


def folder_category(cat: Path):
    """A category in the first of LAYOUTS that recognises `cat`, or None if none does."""
    train_dir, test_dir = next((f for layout in LAYOUTS if (f := layout(cat))), (None, None))
    if train_dir is None:
        return None
    gt = next((d for d in (cat / "ground_truth", test_dir / "ground_truth") if d.is_dir()), None)
    test = []
    for defect in (d for d in subfolders(test_dir) if d.name != "ground_truth"):
        files, anomalous = image_files(defect), defect.name.lower() not in NORMAL
        masks = match_masks(files, gt / defect.name) if gt and anomalous else [[]] * len(files)
        test += [(f, int(anomalous), ms) for f, ms in zip(files, masks)]
    return Category(cat.resolve().name, train_dir, test_dir,  # `--data .` is the folder's own name
                    image_files(train_dir) if train_dir.is_dir() else [], test, has_masks=gt is not None)


#   raw VisA            split_csv/1cls.csv (the split)  <object>/Data/{Images/{Normal,Anomaly},Masks/Anomaly}
def visa_categories(root: Path, only=None) -> list:
    """Raw VisA: the objects of root/split_csv/1cls.csv (columns object, split, label, image, mask;
    paths relative to root), or only the object `only`."""
    table = root / "split_csv" / "1cls.csv"
    if not table.is_file():
        return []
    try:
        with open(table, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{table}: not a UTF-8 CSV table ({type(e).__name__}: {str(e)[:60]})")
    columns = ("object", "split", "label", "image", "mask")
    if rows and not set(columns) <= set(reader.fieldnames):
        raise UserError(f"{table}: expected the columns object,split,label,image,mask")
    cats = {}
    for line, row in rows:
        if None in row or any(row[k] is None for k in columns) or not row["image"]:  # a long or short row
            raise UserError(f"{table}: line {line} does not hold the {len(reader.fieldnames)} cells of its header "
                            f"(an image path among them)")
        if row["split"] not in ("train", "test") or row["label"] not in ("normal", "anomaly"):
            raise UserError(f"{table}: line {line}: split {row['split']!r} or label {row['label']!r} is not "
                            f"train/test, normal/anomaly")
        if only is not None and row["object"] != only:
            continue
        if row["object"] in ("", ".", "..") or Path(row["object"]).name != row["object"]:
            raise UserError(f"{table}: object {row['object']!r} is not a folder name")  # it names an output folder
        files = [root / row[k] for k in ("image", "mask") if row[k]]
        if missing := next((p for p in files if not p.is_file()), None):
            raise UserError(f"{table}: lists {missing}, which does not exist")
        data = root / row["object"] / "Data" / "Images"
        cat = cats.setdefault(row["object"], Category(row["object"], data / "Normal", data, [], []))
        if row["split"] == "train":
            cat.train.append(files[0])
        elif row["label"] == "anomaly" and len(files) < 2:
            raise UserError(f"{table}: {files[0]} is an anomaly without a mask")
        else:
            cat.test.append((files[0], int(row["label"] == "anomaly"), files[1:]))
    return [replace(c, train=sorted(c.train), test=sorted(c.test, key=lambda e: e[0])) for c in cats.values()]


def find_categories(root: Path) -> list:
    """Categories of a category folder, or of a root whose sub-folders (and split_csv/1cls.csv) are categories."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data: {root} is not a folder")
    if (root / "Data" / "Images").is_dir() and (visa := visa_categories(root.resolve().parent, root.resolve().name)):
        return visa  # one object of raw VisA
    if (own := folder_category(root)) is not None:
        return [own]
    cats = {c.name: c for c in visa_categories(root)}
    for d in subfolders(root):
        if d.name not in cats and (c := folder_category(d)) is not None:
            cats[d.name] = c
    if not cats:
        raise UserError(f"--data: {root} holds no category (expected {root}/train/good or {root}/<category>/train/good)")
    return [cats[name] for name in sorted(cats)]


def _load(files, size, mode="RGB", skip=False, scale=1.0, tile=0):
    """read_image of every file, in threads, each at least tile x tile; with skip, an unreadable file
    is None and one warning line."""
    from concurrent.futures import ThreadPoolExecutor

    def read(f):
        try:
            a, original = read_image(f, size, mode, scale)
        except UserError as e:
            if not skip:
                raise
            return e
        if min(a.shape[:2]) < tile:
            raise UserError(f"{f if isinstance(f, (str, os.PathLike)) else 'image'}: {a.shape[1]}x{a.shape[0]}"
                            f"{f' at --tile-scale {scale}' * (scale != 1)} "
                            f"is smaller than the tile ({tile}x{tile}); use a smaller --tile or a larger --tile-scale")
        return a, original

    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        got = list(pool.map(read, files))
    finally:
        pool.shutdown(cancel_futures=True)  # an error or Ctrl-C stops now, not after every queued file
    for r in got:  # the warnings in file order, whichever thread finished first
        if isinstance(r, UserError):
            note(f"warning: {r}; skipped")
    return [None if isinstance(r, UserError) else r for r in got]


def image_geometry(train_config: dict) -> tuple:
    """(size, scale, tile) a checkpoint reads images with: resized to size x size, or (tiles) size
    None: at their own size times scale."""
    if train_config["tile"]:
        return None, train_config["tile_scale"], train_config["tile"]
    return train_config["image_size"], 1.0, 0


def load_train(root, size: int, scale=1.0, tile=0) -> Dataset:
    """Every category's normal images, resized to size x size; size None (tiles): at their own size
    times `scale`, each at least tile x tile."""
    cats, images = find_categories(root), []
    for cat in cats:
        if not cat.train_dir.is_dir():
            raise UserError(f"--data: {cat.train_dir} is missing (every category needs train/good)")
        if not cat.train:
            raise UserError(f"--data: {cat.train_dir} holds no images")
        images += [a for a, _ in _load(cat.train, size, scale=scale, tile=tile)]
    paths = [str(f) for cat in cats for f in cat.train]
    return Dataset(uint8_batch(images), torch.tensor([c for c, cat in enumerate(cats) for _ in cat.train]),
                   [cat.name for cat in cats], paths, root=str(Path(root).resolve()))


def split_calibration(data: Dataset, fraction: float, seed: int) -> tuple:
    """(training, held-out) parts of a training set: floor(fraction * n) of each category's n images,
    drawn with (seed, category), are held out for calibration and never trained on."""
    held = []
    for c in range(len(data.class_names)):
        idx = np.flatnonzero(data.labels.numpy() == c)
        held += np.random.default_rng([seed, c]).permutation(idx)[:math.floor(fraction * len(idx) + 1e-9)].tolist()
    return data.subset(sorted(set(range(len(data))) - set(held))), data.subset(sorted(held))


def image_hashes(images: torch.Tensor) -> list:
    """sha256 of each image as the model sees it (uint8 RGB at the training size), (N, 3, S, S) -> N hex strings."""
    return [hashlib.sha256(x.contiguous().numpy().tobytes()).hexdigest() for x in images]


def read_masks(files, mask_files, sizes, size, scale=1.0) -> list:
    """The union of each image's masks at size x size (size None: as stored, times scale), zeros for
    an image without masks; each mask must have its image's original size (sizes)."""
    flat = [m for ms in mask_files for m in ms]
    masks = iter(zip(flat, _load(flat, size, mode="mask", scale=scale)))
    out = []
    for f, ms, (w, h) in zip(files, mask_files, sizes):
        out.append(np.zeros((size, size) if size else (round(scale * h), round(scale * w)), np.uint8))
        for m, (a, msize) in itertools.islice(masks, len(ms)):
            if msize != (w, h):
                raise UserError(f"{m}: mask is {msize[0]}x{msize[1]} but its image {f} is {w}x{h}")
            out[-1] |= a
    return out


def load_test(root, size: int, scale=1.0, tile=0) -> dict:
    """{category: Dataset} with anomaly labels and masks (zeros for normal images, and for all images of a
    category without ground truth) at size x size; size None (tiles): own size times `scale`, one per category."""
    out = {}
    for cat in find_categories(root):
        if not cat.test_dir.is_dir():
            raise UserError(f"--data: {cat.test_dir} is missing")
        if not cat.test:
            raise UserError(f"--data: {cat.test_dir} holds no images")
        files, anomalous, mask_files = (list(v) for v in zip(*cat.test))
        loaded = _load(files, size, scale=scale, tile=tile)
        sizes = [s for _, s in loaded]
        if other := next((f for f, (a, _) in zip(files, loaded) if a.shape != loaded[0][0].shape), None):
            raise UserError(f"{other}: {sizes[files.index(other)]} differs from {files[0]}'s {sizes[0]}; "
                            f"a tiled model tests one image size per category (score takes any)")
        gt = np.stack(read_masks(files, mask_files, sizes, size, scale))
        for f, ms, m in zip(files, mask_files, gt):
            if ms and not m.any():
                note(f"warning: {ms[0]}: the mask of defect image {f} reads empty "
                     f"at {gt.shape[2]}x{gt.shape[1]} (no non-zero pixel); it adds no anomalous pixel")
        if not cat.has_masks:
            note(f"{cat.name}: no ground_truth folder, so image metrics only; pixel metrics are n/a")
        out[cat.name] = Dataset(uint8_batch([a for a, _ in loaded]), torch.zeros(len(files), dtype=torch.long),
                                [cat.name], [str(f) for f in files], np.array(anomalous), gt,
                                mask_files=mask_files if cat.has_masks else None, sizes=sizes)
    return out


def make_demo_dataset(root: Path, size: int = 64, n_train: int = 120, n_test: int = 20, seed: int = 0) -> Path:
    """Two procedural textures with scratch and stain defects, in MVTec-AD layout (numpy only)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size

    def texture(kind):
        phase, jitter = rng.uniform(0, 2 * np.pi, 2), rng.normal(0, 0.03, (size, size, 1))
        if kind == "weave":
            v = 0.5 + 0.25 * np.sin(2 * np.pi * 8 * xx + phase[0]) * np.sin(2 * np.pi * 8 * yy + phase[1])
            rgb = v[..., None] * np.array([0.9, 0.75, 0.5])
        else:  # "grid"
            v = ((np.sin(2 * np.pi * 6 * xx + phase[0]) > 0.6) | (np.sin(2 * np.pi * 6 * yy + phase[1]) > 0.6))
            rgb = 0.35 + 0.4 * v[..., None] * np.array([0.6, 0.7, 0.9])
        return (np.clip(rgb + jitter, 0, 1) * 255).round().astype(np.uint8)

    def defect(img, kind):
        cx, cy = rng.uniform(0.2, 0.8, 2)
        if kind == "scratch":
            angle, length = rng.uniform(0, np.pi), rng.uniform(0.2, 0.45)
            d = np.abs((xx - cx) * np.sin(angle) - (yy - cy) * np.cos(angle))
            along = np.abs((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle))
            mask = (d < 1.5 / size) & (along < length / 2)
        else:  # "stain"
            rx, ry = rng.uniform(0.05, 0.12, 2)
            mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        img[mask] = (rng.uniform(0, 1, 3) * 255).round()
        return img, mask

    for cat in ("weave", "grid"):
        for split, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                save_image(root / cat / split / "good" / f"{i:03d}.png", texture(cat))
        for kind in ("scratch", "stain"):
            for i in range(n_test // 2):
                img, mask = defect(texture(cat), kind)
                save_image(root / cat / "test" / kind / f"{i:03d}.png", img)
                save_image(root / cat / "ground_truth" / kind / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)
    return root


# ----------------------------------------------------------------------------
# Evaluation: score every test image of every category, write what the metrics used.

class Progress:
    """`{unit} done/total, images/s, eta` to `log` every few seconds and at the end: images while
    scoring, steps (of `per` images each) while training, from `done` on."""

    def __init__(self, total: int, unit="images", done=0, per=1, log=note):
        self.total, self.unit, self.done, self.start, self.per, self.log = total, unit, done, done, per, log
        self.t0 = self.t_log = time.time()

    def __call__(self, n: int, extra="") -> None:
        self.done = min(self.total, self.done + n)
        now = time.time()
        if now - self.t_log > 5 or self.done == self.total:
            self.t_log = now
            rate = (self.done - self.start) / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            self.log(f"{self.unit} {self.done}/{self.total}  {extra}{rate * self.per:.2f} img/s  eta {eta / 60:.1f} min")


def score_dataset(model, data: Dataset, cfg: ScoreConfig, mean, std, device, labels_for=None, progress=None,
                  tile=0, grid=0):
    """Heatmaps (N, S, S) and scores (N,) for a Dataset; under torchrun each rank scores every world-th
    image and rank 0 gathers them. With tile > 0 (a tiled checkpoint) each image is scored in tiles
    (tiled_maps) and its map has the image's own size: a (N, H, W) tensor, or a list of (H, W) maps if
    the sizes differ; with grid > 0 each tile's label also names its cell (position_labels)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = list(range(rank, len(data), world))

    def heat_of(x, places=None, cells=None):  # uint8 (n, 3, h, w) -> (n, h, w)
        y = normalise(x.to(device), mean, std)
        labels = position_labels(None if labels_for is None else torch.full((len(x),), labels_for), cells, grid)
        return SCORERS[cfg.score](model, y, None if labels is None else labels.to(device), cfg, places)

    probe = torch.empty(1, 3, *((tile, tile) if tile else data.images[0].shape[-2:]), device=device)
    per_call = max(1, forward_batch(cfg, model, probe) // (cfg.K * cfg.T if cfg.score == "mismatch" else cfg.K))
    if tile:
        maps = tiled_maps(heat_of, [data.images[i] for i in mine], tile, cfg.stride or tile // 2,
                          per_call, progress and (lambda n: progress(n * world)), grid)
        got = dict(zip(mine, maps))
        heat = [got.get(i, torch.zeros(x.shape[-2:])) for i, x in enumerate(data.images)]
        if len({h.shape for h in heat}) == 1:
            heat = torch.stack(heat)
    else:
        heat = torch.zeros(len(data), *data.images.shape[2:])
        for i in range(0, len(mine), per_call):
            ids = mine[i:i + per_call]
            heat[ids] = heat_of(data.images[ids]).cpu()
            if progress is not None:
                progress(len(ids) * world)
    if world > 1:  # each image was scored by exactly one rank
        for h in (heat,) if torch.is_tensor(heat) else heat:
            reduced = h.to(device)
            dist.all_reduce(reduced)
            h.copy_(reduced.cpu())
    heat = smooth_maps(heat, cfg.smooth)  # before S, so that S, metrics and thresholds see one map
    return heat, torch.cat([image_score(h[None], cfg.image_score) for h in heat])  # image by image: sizes may differ


def overlay_name(path) -> str:
    """An image's overlay, relative to the overlay folder: its folder's name / its file name + .png
    (test/scratch/000.png -> scratch/000.png.png), so a.png and a.jpg, or the 000.png of two defect
    folders, never share one; from the absolute path, so `..` never leads out."""
    p = Path(os.path.abspath(path))
    name = os.fsencode(p.name)
    if len(name) > 250:  # a file name holds 255 bytes, with .tiff too: a longer one keeps its start and a digest
        return str(Path(p.parent.name, os.fsdecode(name[:200]) + "~" + hashlib.sha256(name).hexdigest()[:16] + ".png"))
    return str(Path(p.parent.name, p.name + ".png"))


COLOURS = "inferno"  # the heatmaps' colour map: perceptually ordered, its maximum the brightest colour
OVERLAY_HEIGHT = (256, 1024)  # an overlay is at least this high (nearest pixel), and at most this at the image's own size


def colour_bar(height: int, lo: float, hi: float) -> np.ndarray:
    """The overlays' colour scale as an (height, width, 3) uint8 panel: the colour map from lo (bottom)
    to hi (top; larger values take hi's colour), the values of H written beside it."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=max(10, height // 16))
    labels = [(f"H >= {hi:.3g}", 0), (f"{(lo + hi) / 2:.3g}", 0.5), (f"{lo:.3g}", 1)]
    bar, pad = max(8, height // 16), max(4, height // 64)
    panel = Image.new("RGB", (2 * pad + bar + pad + max(font.getbbox(t)[2] for t, _ in labels) + pad, height), "white")
    ramp = (colormaps[COLOURS](np.linspace(1, 0, height))[:, :3] * 255).astype(np.uint8)
    panel.paste(Image.fromarray(np.repeat(ramp[:, None], bar, 1)), (2 * pad, 0))
    draw, tall = ImageDraw.Draw(panel), font.getbbox("0.9")[3]
    for text, at in labels:
        draw.text((3 * pad + bar, min(max(0, at * height - tall / 2), height - tall - 2)), text, fill="black", font=font)
    return np.asarray(panel)


def write_overlays(folder: Path, data: Dataset, heat: np.ndarray, span=None) -> tuple:
    """image | ground-truth mask | heatmap H | its colour scale, one PNG per image named by overlay_name;
    the metrics never see it. At the image's own resolution where the model's input is smaller (the heat
    upsampled bilinearly), within OVERLAY_HEIGHT. span: the colour range (lo, hi), by default the
    heatmaps' minimum and 99.9th percentile, shared by the category; returns it."""
    from matplotlib import colormaps

    flat = np.concatenate([np.ravel(h) for h in heat])
    lo, hi = span or (float(flat.min()), float(np.percentile(flat, 99.9)))
    bars = {}  # colour_bar by height: the same for every image of that height
    for i, path in enumerate(data.paths):
        img, mask, h = data.images[i].permute(1, 2, 0).numpy(), data.masks[i], np.asarray(heat[i])
        W, H = data.sizes[i] if data.sizes else img.shape[1::-1]
        if H > img.shape[0] and path is not None:
            f = min(1.0, OVERLAY_HEIGHT[1] / H)
            img = read_image(Path(path), None, scale=f)[0]
            [mask] = read_masks([path], [data.mask_files[i] if data.mask_files else []], [(W, H)], None, f)
            h = upsample(h, img.shape[1::-1])
        k = -(-OVERLAY_HEIGHT[0] // img.shape[0])
        img, mask, h = (np.repeat(np.repeat(a, k, 0), k, 1) for a in (img, mask, h))
        if len(img) not in bars:
            bars[len(img)] = colour_bar(len(img), lo, hi)
        colour = (colormaps[COLOURS](np.clip((h - lo) / max(hi - lo, 1e-12), 0, 1))[..., :3] * 255).astype(np.uint8)
        gap = np.full((len(img), max(2, len(img) // 128), 3), 255, np.uint8)
        save_image(folder / overlay_name(path), np.concatenate(
            [img, gap, np.repeat(mask[..., None] * 255, 3, 2).astype(np.uint8), gap, colour, bars[len(img)]], axis=1))
    return lo, hi


def percent(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def table(head, rows, html=False) -> str:
    """head and rows (lists of cells) as a markdown table, or as an HTML table of the same cells."""
    if not html:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                         ["| " + " | ".join(map(str, row)) + " |" for row in rows])
    from html import escape

    lines = [[f"<th>{escape(str(c))}</th>" for c in head]] + [
        [f"<th>{escape(str(row[0]))}</th>"] + [f"<td>{escape(str(c))}</td>" for c in row[1:]] for row in rows]
    return "<table>" + "".join("<tr>" + "".join(cells) + "</tr>" for cells in lines) + "</table>"


def write_csv(path: Path, rows) -> None:
    """rows as a CSV file, atomically, in UTF-8 under any locale, a file name that is not valid UTF-8 as its
    own bytes (surrogateescape). Text cells a spreadsheet shows and never runs: one beginning with = + - @,
    a tab, a carriage return or ' gets one ' in front (a reader drops one leading ' to get it back)."""
    with atomic_write(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        csv.writer(f).writerows([("'" + c if isinstance(c, str) and c.startswith(tuple("=+-@\t\r'")) else c)
                                 for c in row] for row in rows)


def format_table(results: dict, html=False) -> str:
    """Percent, n/a where a metric could not be computed. A mean over k < n categories says so:
    `mean (k/n)` when every metric has the same k, else each such cell."""
    n = len(results) - 1
    counts = [sum(m[k] is not None for name, m in results.items() if name != MEAN) for k in METRICS]
    rows = []
    for name, m in results.items():
        cells = [percent(m[k]) for k in METRICS]
        if name == MEAN and len(set(counts)) == 1 and 0 < counts[0] < n:
            name = f"mean ({counts[0]}/{n})"
        elif name == MEAN:
            name, cells = "mean", [f"{c} ({k}/{n})" if 0 < k < n else c for c, k in zip(cells, counts)]
        rows.append([name, *cells])
    return table(["category", *METRICS], rows, html)


def write_report(out: Path, title: str, tests: dict, scored: dict, results: dict, cfg: ScoreConfig,
                 overlays=True) -> None:
    """out/report.html, headed `title`, a static page to read the evaluation by eye: the metrics table, each
    category's image ROC, pixel ROC and PRO curves (out/report/CATEGORY.png) and its overlays, worst
    first (the defects the model found least, then its false alarms)."""
    from html import escape
    from urllib.parse import quote

    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    (out / "report").mkdir(parents=True, exist_ok=True)

    page = ["<!doctype html><html><head><meta charset='utf-8'><title>flow-mismatch evaluation</title><style>",
            "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{border:1px solid #bbb;"
            "padding:3px 8px;text-align:right}figure{display:inline-block;margin:4px}"
            "figure img{height:160px}figcaption{font-size:12px}</style></head><body>",
            f"<h1>flow-mismatch evaluation</h1><p>{escape(title)}: score {escape(cfg.score)}, K={cfg.K}, "
            f"T={cfg.T}, aggregator {escape(cfg.aggregator)}, w(t) = {escape(cfg.weight)}, seed {cfg.seed}. "
            "Metrics in %; n/a: not computable on this test set.</p>", format_table(results, html=True)]
    page.append("<p>Categories: " + ", ".join(f"<a href='#{quote(n)}'>{escape(n)}</a>" for n in scored)
                + f". Overlays: image | ground truth | heatmap H ({COLOURS}: the brighter, the more anomalous) | "
                  "its colour scale, one range per category (values above its top take the brightest colour); "
                  "click one for full size.</p>")
    for name, (heat, scores) in scored.items():
        data, r = tests[name], results.get(name, {})
        fig = Figure(figsize=(12, 3.6), layout="constrained")
        roc = [roc_curve(truth.astype(bool), pred)[:2] if 0 < truth.sum() < truth.size else None
               for truth, pred in ((data.anomalous, scores), (data.masks.ravel(), heat.ravel()))]
        panels = [(f"image ROC, AUROC {percent(r.get('image_auroc'))}", roc[0], "true positive rate"),
                  (f"pixel ROC, AUROC {percent(r.get('pixel_auroc'))}", roc[1], "true positive rate"),
                  (f"PRO, AUPRO (FPR <= 0.3) {percent(r.get('pixel_aupro'))}", pro_curve(data.masks, heat),
                   "per-region overlap")]
        for ax, (title, curve, ylabel) in zip(fig.subplots(1, 3), panels):
            if curve is not None:
                ax.plot(*curve, lw=2, clip_on=False)  # at AUROC 100 the curve runs along the frame: drawn over it
            ax.set(title=title, xlabel="false positive rate", ylabel=ylabel, xlim=(-0.02, 1.02), ylim=(-0.02, 1.04))
        fig.axes[2].axvline(0.3, color="grey", ls=":")  # the AUPRO's FPR limit
        with atomic_write(out / "report" / f"{name}.png", "wb") as f:
            fig.savefig(f, format="png", dpi=80)
        page.append(f"<h2 id='{quote(name)}'>{escape(name)}</h2><img src='report/{quote(name)}.png' alt='curves of {escape(name)}'>")
        if not overlays:
            continue
        normal, defect = np.flatnonzero(data.anomalous == 0), np.flatnonzero(data.anomalous == 1)
        for title, order in (("defective images, lowest score first", defect[np.argsort(scores[defect], kind="stable")]),
                             ("normal images, highest score first", normal[np.argsort(-scores[normal], kind="stable")])):
            page.append(f"<h3>{escape(name)}: {title}</h3><div>")
            for i in order:
                src = overlay_name(data.paths[i])
                rel = escape(src.removesuffix(".png"))  # <folder>/<file>
                link = f"{quote(name)}/overlays/{quote(src)}"
                page.append(f"<figure><a href='{link}'><img src='{link}' loading='lazy' alt='{rel}'></a>"
                            f"<figcaption>S = {scores[i]:.4g} &middot; {rel}</figcaption></figure>")
            page.append("</div>")
    write_text(out / "report.html", "\n".join(page + ["</body></html>"]) + "\n")


def score_tests(detector, tests: dict, cfg: ScoreConfig) -> dict:
    """{category: (heat (N, S, S) float32, scores (N,))} by the Detector, on rank 0; {} on other ranks."""
    ckpt = detector.ckpt
    if unknown := [name for name in tests if name not in ckpt["class_names"]]:
        raise UserError(f"--data: category {unknown[0]!r} is not among the checkpoint's classes {ckpt['class_names']}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    progress = Progress(sum(len(d) for d in tests.values())) if rank == 0 else None
    out = {}
    for name, data in tests.items():
        label = ckpt["class_names"].index(name) if ckpt["conditional"] else None
        heat, scores = score_dataset(detector.model, data, cfg, detector.mean, detector.std, detector.device, label,
                                     progress, tile=detector.geometry[2], grid=detector.grid)
        if rank == 0:
            out[name] = heat.numpy().astype(np.float32), scores.numpy()
    return out


def upsample(heat: np.ndarray, size) -> np.ndarray:
    """A heatmap (h', w') at size (w, h), bilinear (as it is if it has that size): (h, w) float32."""
    heat = np.asarray(heat, np.float32)
    if heat.shape == tuple(size[::-1]):
        return heat
    return F.interpolate(torch.from_numpy(heat)[None, None], size=size[::-1], mode="bilinear",
                         align_corners=False)[0, 0].numpy()


def at_eval_size(data: Dataset, heat: np.ndarray, size) -> tuple:
    """(masks, heatmaps) at size x size, or at each image's original size (size "original"): the
    heatmaps upsampled bilinearly, the masks read again at that size (nearest neighbour)."""
    sizes = data.sizes if size == "original" else [(size, size)] * len(data)  # (w, h)
    masks = read_masks(data.paths, data.mask_files, data.sizes, None if size == "original" else size)
    return masks, [upsample(h, s) for h, s in zip(heat, sizes)]


def map_names(category: str, path) -> tuple:
    """(TIFF map, PNG mask or None) of a test image, relative to the maps folder, where the official
    evaluation scripts read them: <category>/test/<defect>/<name>.tiff (MVTec AD, MVTec LOCO and the
    other test/ layouts; no mask); anomaly_images/<category>/<split>/<good|bad>/<name>.tiff and
    anomaly_images_thresholded/.../<name>.png (MVTec AD 2, split test_public)."""
    p = Path(os.path.abspath(path))
    rel = Path(category, p.parent.parent.name, p.parent.name)  # then the image's stem, dots and all, and a suffix
    if p.parent.parent.name.startswith("test_"):  # MVTec AD 2: test_public, test_private, test_private_mixed
        return Path("anomaly_images", rel, p.stem + ".tiff"), Path("anomaly_images_thresholded", rel, p.stem + ".png")
    return rel / (p.stem + ".tiff"), None


def map_tops(names, threshold=None) -> dict:
    """write_maps's plan: {top folder, relative to the maps folder (a category's, or
    anomaly_images/<category>): [(i, file relative to the maps folder)]}; no two images may share a map."""
    tops, seen = {}, set()
    for i, (tiff, png) in enumerate(names):
        if tiff in seen:
            raise UserError(f"{tiff}: two images would share this map (same name, other extension)")
        seen.add(tiff)
        for rel in filter(None, (tiff, png if threshold is not None else None)):
            tops.setdefault(Path(*rel.parts[:1 + rel.parts[0].startswith("anomaly_images")]), []).append((i, rel))
    return tops


def check_maps(out: Path, tops) -> None:
    """Before anything is written: every folder write_maps would replace in `out` is new or its own."""
    for top in tops:
        check_ours(out, [top.parts[0], *STAGING], "--save-maps")
        check_ours(out / top.parent, [top.name, *STAGING], "--save-maps")


def write_maps(out: Path, names, heat, sizes, threshold=None) -> None:
    """Each map as a float32 TIFF at its image's original size sizes[i] = (w, h), at out / names[i][0];
    with a threshold also the binary mask map > threshold as a 0/255 PNG at out / names[i][1] (if not
    None). Each top folder of map_tops is staged and replaces its namesake whole."""
    tops = map_tops(names, threshold)
    check_maps(out, tops)
    for top, items in tops.items():
        (out / top.parent).mkdir(parents=True, exist_ok=True)
        if top.parent != Path("."):
            record(out, [top.parts[0]])
        with staged(out / top.parent) as new:
            for i, rel in items:
                m = upsample(heat[i], sizes[i])
                save_image(new / top.name / rel.relative_to(top),
                           m if rel.suffix == ".tiff" else (m > threshold).astype(np.uint8) * 255)


def parse_eval_size(value):
    """--eval-size, as text (the CLI) or a value (evaluate, run_sweep; None: the training size): an integer
    from 1 to 8192 (8192^2 floats per image are 256 MiB; more is a typo) or "original"."""
    value = int(value) if isinstance(value, str) and value.isdigit() else value
    if value not in (None, "original") and (type(value) is not int or not 1 <= value <= 8192):
        raise UserError(f"--eval-size: {value!r} is neither an integer from 1 to 8192 nor 'original'")
    return value


def metrics_of(tests: dict, scored: dict, eval_size=None, cals=None, alarm_rate=None) -> dict:
    """The seven metrics per category (pixel metrics at the training resolution, or at eval_size: N
    or "original") and, with alarm_rate, the operating point of its calibration cals[category]; their
    mean over the categories that have each (None if none has it), with the number of those
    categories per metric (mean.categories)."""
    results = {}
    for name, (heat, scores) in scored.items():
        data = tests[name]
        masks = None if data.mask_files is None else data.masks
        point = operating_point(cals[name], alarm_rate, scores, data.anomalous, heat, masks) if alarm_rate else {}
        if masks is not None and eval_size is not None:
            masks, heat = at_eval_size(data, heat, eval_size)
        results[name] = {**compute_metrics(data.anomalous, scores, masks, heat), **point}
    values = {k: [r[k] for r in results.values() if r[k] is not None] for k in METRICS + OPERATING * bool(alarm_rate)}
    results[MEAN] = {k: float(np.mean(v)) if v else None for k, v in values.items()}
    results[MEAN]["categories"] = {k: len(v) for k, v in values.items()}  # how many each mean is over
    return results


def evaluate(ckpt_path, data_root, out: Path, cfg: ScoreConfig, device="auto", overlays=True, compile=False,
             log=print, eval_size=None, alarm_rate=None, save_maps=None) -> dict:
    """Score the test split of every category under data_root; write metrics and heatmaps to out.
    eval_size and alarm_rate: as metrics_of; with save_maps, a folder, also every map at its image's
    original size where the official evaluations read them (write_maps)."""
    eval_size, alarm_rate = parse_eval_size(eval_size), check_knob(ALARM_RATE, alarm_rate)
    check_paths({"--out": out, "--save-maps": save_maps}, {"--data": data_root})
    maps = run_lock(Path(save_maps), "--save-maps", "test") if save_maps is not None else contextlib.nullcontext()
    with run_lock(out, "--out", "test"), maps:  # one writer per output folder
        rank, world, local_rank = distributed()
        device = pick_device(device, local_rank)
        detector = load(ckpt_path, device, compile)
        ckpt, cfg = detector.ckpt, detector.fit(cfg)
        cats = {c.name: [f for f, *_ in c.test] for c in find_categories(data_root)}  # checked before decoding
        cals = {name: calibration_of(ckpt, name, cfg, ckpt_path, alarm_rate) for name in cats if alarm_rate is not None}
        check_ours(out, [*cats, "metrics.json", "table.md", "report.html", "report", *STAGING])
        if save_maps is not None:  # every clash of names before the first byte is written
            for name, files in cats.items():
                check_maps(Path(save_maps), map_tops([map_names(name, f) for f in files], alarm_rate))
        tests = load_test(data_root, *detector.geometry)
        t0 = time.time()
        scored = score_tests(detector, tests, cfg)
        seconds, n_images = time.time() - t0, sum(len(d) for d in tests.values())
        if rank != 0:
            return {}
        results = metrics_of(tests, scored, eval_size, cals, alarm_rate)
        text = format_table(results)
        if alarm_rate:
            text += f"\n\nAt --alarm-rate {alarm_rate} (calibrated thresholds), in percent:\n\n" + table(
                ["category", *OPERATING], [[name, *(percent(m[k]) for k in OPERATING)] for name, m in results.items()])
        with staged(out) as new:
            for name, (heat, scores) in scored.items():
                data, folder = tests[name], new / name
                folder.mkdir()
                write_csv(folder / "scores.csv", [("path", "label", "score"),
                                                  *zip(data.paths, data.anomalous.tolist(), scores.tolist())])
                with atomic_write(folder / "heatmaps.npz", "wb") as f:
                    np.savez_compressed(f, paths=np.array(data.paths), labels=data.anomalous.astype(np.uint8),
                                        scores=scores.astype(np.float32), heat=heat, masks=data.masks)
                if overlays:
                    write_overlays(folder / "overlays", data, heat)
            write_text(new / "metrics.json", json.dumps(results, indent=2, allow_nan=False))
            write_text(new / "table.md", text + "\n")
            write_report(new, out.name, tests, scored, results, cfg, overlays)
        if save_maps is not None:
            for name, (heat, _) in scored.items():
                write_maps(Path(save_maps), [map_names(name, p) for p in tests[name].paths], heat, tests[name].sizes,
                           conformal_threshold(cals[name]["maxima"], alarm_rate) if alarm_rate else None)
        log(text)
        rule = (f"K={cfg.K} T={cfg.T} aggregator={cfg.aggregator} w={cfg.weight}" if cfg.score == "mismatch" else
                f"{cfg.score}: K={cfg.K} t0={cfg.t0}{f' steps={cfg.ode_steps}' * (cfg.score == 'recon')} "
                f"aggregator={cfg.aggregator}") + f" smooth={cfg.smooth:g}" * bool(cfg.smooth)
        log(f"{rule}: {n_images} images in {seconds:.1f} s ({n_images / seconds:.2f} images/s on {device} x{world})")
        if eval_size is not None or cfg.image_score != "paper":
            at = "each image's original size" if eval_size == "original" else f"{eval_size or ckpt['train_config']['image_size']}^2"
            log(f"image score: {cfg.image_score}; pixel metrics at {at}")
        return results


# Ablations (Tables 6-9, the baselines of Table 2): one loaded test set, each model loaded once,
# a row per setting with the mean over categories of the seven metrics and the scoring speed.
def run_sweep(ckpt_paths, data_root, out: Path, base: ScoreConfig, grid: dict, device="auto", compile=False,
              log=print, eval_size=None) -> list:
    """Every checkpoint x the Cartesian product of `grid` ({ScoreConfig field: values}, fields not
    in it stay as in `base`); writes out/sweep.md and out/sweep.json (per-category results too)."""
    eval_size = parse_eval_size(eval_size)
    check_paths({"--out": out}, {"--data": data_root})
    with run_lock(out, "--out", "test"):
        check_ours(out, ["sweep.md", "sweep.json", *STAGING])
        settings = [replace(base, **dict(zip(grid, values))) for values in itertools.product(*grid.values())]
        rank, world, local_rank = distributed()
        device = pick_device(device, local_rank)
        rows, tests = [], {}
        for path in ckpt_paths:  # each checkpoint and its --stride checked before the first is scored
            load(path, "cpu").fit(base)  # (the grid never varies --stride)
        for path in ckpt_paths:
            detector = load(path, device, compile)
            size = detector.geometry
            if size not in tests:
                tests[size] = load_test(data_root, *size)
            n_images = sum(len(d) for d in tests[size].values())
            for cfg in settings:
                t0 = time.time()
                scored = score_tests(detector, tests[size], cfg)
                fps = n_images / (time.time() - t0)
                if rank == 0:
                    setting = {"ckpt": str(path)} if len(ckpt_paths) > 1 else {}
                    setting.update({f: getattr(cfg, f) for f in grid})
                    rows.append(dict(setting=setting, images_per_s=fps, results=metrics_of(tests[size], scored, eval_size)))
                    note(f"{setting}: image AUROC {percent(rows[-1]['results'][MEAN]['image_auroc'])}, "
                         f"{fps:.2f} images/s")
        if rank != 0:
            return []
        keys = list(rows[0]["setting"])
        md = table(keys + list(METRICS) + ["images/s"], [[r["setting"][k] for k in keys] + [
            percent(r["results"][MEAN][k]) for k in METRICS] + [f"{r['images_per_s']:.2f}"] for r in rows])
        with staged(out) as new:
            write_text(new / "sweep.md", md + "\n")
            write_text(new / "sweep.json", json.dumps(dict(base=asdict(base), device=str(device), rows=rows), indent=2,
                                                      allow_nan=False))
        log(md)
        return rows


# ----------------------------------------------------------------------------
# Calibration: decisions with a finite-sample false-alarm guarantee, from normal images alone
# (split-conformal inference: Vovk, Gammerman and Shafer, "Algorithmic Learning in a Random World",
# 2005; Bates et al., "Testing for outliers with conformal p-values", Ann. Statist. 2023).
#
# s_1..s_n are the scores S of n normal images the model was not trained on. If the score s of a
# new normal image is exchangeable with them,
#   p(s) = (1 + #{i : s_i >= s}) / (n + 1)     is super-uniform: P(p(s) <= A) <= A for every A,
# and deciding p(s) <= A is deciding s > tau_A, the k-th smallest s_i with k = ceil((n + 1)(1 - A)):
#   A - 1/(n + 1) <= P(false alarm) <= A       (the lower bound holds when scores do not tie).
# P is over the calibration images and the new image together; for one fixed calibration set the
# rate is Beta(floor((n + 1) A), n + 1 - floor((n + 1) A)) distributed, sd about sqrt(A (1 - A) / (n + 2)).
# k <= n needs A >= 1/(n + 1). The defect masks apply the same rule to the heatmap maxima max H:
# pixels above tau_A(maxima), so a normal image shows any flagged pixel with probability <= A.
# Exchangeability needs one rule for both: a calibration image is scored as any image is, its paths
# drawn from (seed, k) alone. Calibrations record it as noise = NOISE_RULE; older ones drew the paths
# from the image's position among the calibration images and are refused.

NOISE_RULE = "seed-path"
SCORE_RULE = ("score", "K", "T", "aggregator", "weight", "t0", "ode_steps", "image_score", "stride",
              "smooth")  # shared by both
OPERATING = ("false_alarm_rate", "detection_rate", "pixel_precision", "pixel_recall")
ALARM_RATE = knob(None, "false-alarm rate A of the decisions; None: none", gt=0, lt=1, kind=float, flag="--alarm-rate")


def p_values(calib, s) -> np.ndarray:
    """Conformal p-values (1 + #{calib >= s}) / (n + 1) of the scores s."""
    calib, s = np.sort(np.asarray(calib, np.float64)), np.asarray(s, np.float64)
    return (1 + len(calib) - np.searchsorted(calib, s, side="left")) / (len(calib) + 1)


def conformal_threshold(calib, A: float) -> float:
    """tau_A: the ceil((n + 1)(1 - A))-th smallest calibration score. Its rank is counted with the
    p-values' own arithmetic, so s > tau_A exactly when p(s) <= A."""
    n = len(calib)
    j = int(np.sum(np.arange(1, n + 2) / (n + 1) <= A))  # floor((n + 1) A): calibration scores above tau_A
    if j == 0:
        raise UserError(f"--alarm-rate: {A} is below 1/(n+1) = {1 / (n + 1):.3g}, the smallest rate n = {n} "
                        f"calibration images can certify; raise it or calibrate on at least "
                        f"{math.ceil(1 / A) - 1} normal images")
    return float(np.sort(np.asarray(calib, np.float64))[n - min(j, n)])


@torch.no_grad()
def calibrate_on(model, data: Dataset, cfg: ScoreConfig, mean, std, device, label, step: int, tile=0,
                 grid=0) -> dict:
    """Scores and heatmap maxima of normal images the model was not trained on, bound to what made
    them: the images (data.paths, absolute, and their sha256), the rule, the weights' step."""
    heat, scores = score_dataset(model, data, cfg, mean, std, device, label, tile=tile, grid=grid)
    return dict(scores=scores.tolist(), maxima=[float(h.max()) for h in heat], paths=list(data.paths),
                sha256=image_hashes(data.images), rule={f: getattr(cfg, f) for f in SCORE_RULE}, step=step,
                noise=NOISE_RULE)


def check_calibration(record, at: str) -> None:
    """A stored calibration as calibrate_on writes it: scores and maxima, lists of the same length of
    finite numbers; paths and sha256, strings, one per score; a rule of SCORE_RULE fields, each a value
    its flag takes; the step an integer. at: the error's prefix, up to the key's opening quote."""
    if not isinstance(record, dict):
        raise UserError(f"{at}' holds a {type(record).__name__}, not a calibration record")
    n = len(record.get("scores") or ())
    for key in ("scores", "maxima", "paths", "sha256"):
        v, kind = record.get(key), str if key in ("paths", "sha256") else (int, float)
        if not isinstance(v, list) or not v or len(v) != n or not all(
                isinstance(x, kind) and not isinstance(x, bool) and (kind is str or math.isfinite(x)) for x in v):
            raise UserError(f"{at}.{key}' is not a list of {n or 'some'} "
                            f"{'names' if kind is str else 'finite numbers'}")
    rule, score_fields = record.get("rule", {}), {f.name: f for f in fields(ScoreConfig)}
    if not isinstance(rule, dict) or not set(rule) <= set(SCORE_RULE):
        raise UserError(f"{at}.rule' is not a mapping of {', '.join(SCORE_RULE)}")
    for key, value in rule.items():
        check_knob(score_fields[key], value, f"{at}.rule.{key}'")
    if type(record.get("step")) is not int:
        raise UserError(f"{at}.step' is not an integer")


def bound_images(record: dict, size, scale=1.0, known=None) -> torch.Tensor:
    """The images a record {"paths", "sha256"} names (a run's hold-out, a calibration), each checked
    against its sha256: a missing or changed file is an error naming it. size, scale: as _load reads
    them; known: {path: image} in memory."""
    paths, hashes, known = record.get("paths"), record.get("sha256"), known or {}
    if not isinstance(paths, list) or not isinstance(hashes, list) or len(paths) != len(hashes) or not paths:
        raise UserError("the checkpoint records no images with their sha256 for it")
    for p in paths:
        if p not in known and not Path(p).is_file():
            raise UserError(f"{p}: missing; it is one of the recorded calibration images")
    read = iter(_load([Path(p) for p in paths if p not in known], size, scale=scale))
    images = uint8_batch([known[p].permute(1, 2, 0).numpy() if p in known else next(read)[0] for p in paths])
    for p, h, h_now in zip(paths, hashes, image_hashes(images)):
        if h != h_now:
            raise UserError(f"{p}: changed since it was recorded as a calibration image (its sha256 differs)")
    return images


def check_unseen(ckpt: dict, data: Dataset, ckpt_path) -> None:
    """No calibration image is among the images the checkpoint was trained on (by sha256)."""
    if "trained_on" not in ckpt:
        note(f"warning: {ckpt_path} does not record its training images; cannot check that none is among "
             f"the calibration images")
    trained = set(ckpt.get("trained_on", ()))
    seen = [f for f, h in zip(data.paths, image_hashes(data.images)) if h in trained]
    if seen:
        raise UserError(f"--data: {len(seen)} of {len(data)} images were used to train {ckpt_path} (e.g. {seen[0]}); "
                        f"calibrate on normal images the model has not seen")


def calibration_of(ckpt: dict, category, cfg: ScoreConfig, ckpt_path, A: float) -> dict:
    """The checkpoint's calibration of `category`, checked to fit cfg's scoring rule and the rate A."""
    A = check_knob(ALARM_RATE, A)
    names = ckpt["class_names"]
    category = category or (names[0] if len(names) == 1 else None)
    if category is None:
        raise UserError(f"give one of {names}; each category has its own calibration", keyword="category")
    cal = (ckpt.get("calibration") or {}).get(category)
    if cal is None:
        raise UserError(f"--alarm-rate: {ckpt_path} holds no calibration of {category}; train with --calib-fraction "
                        f"or run: calibrate --ckpt {ckpt_path} --data FOLDER_OF_NORMAL_IMAGES")
    if cal.get("noise") != NOISE_RULE:
        raise UserError(f"--alarm-rate: the calibration of {category} in {ckpt_path} drew its path noise from each "
                        f"image's position, an older rule than scoring's; recalibrate: calibrate --ckpt {ckpt_path} "
                        f"--category {category} (rescores the run's hold-out; --data FOLDER for other normal images)")
    if cal.get("step") != ckpt["step"]:
        raise UserError(f"--alarm-rate: the calibration of {category} in {ckpt_path} was scored on the weights of "
                        f"step {cal.get('step')}, not on these (step {ckpt['step']}); run calibrate --ckpt {ckpt_path} "
                        f"again")
    differ = [f for f in SCORE_RULE if cal["rule"].get(f, getattr(ScoreConfig, f)) != getattr(cfg, f)]  # older: default
    if differ:
        flags = " ".join(f"{'-' * (1 + (len(f) > 1))}{f.replace('_', '-')} {cal['rule'].get(f)}" for f in differ)
        raise UserError(f"--alarm-rate: the calibration of {category} was scored with {flags}; score with the same "
                        f"or recalibrate with yours: calibrate --ckpt {ckpt_path} ...")
    conformal_threshold(cal["scores"], A)
    return cal


def operating_point(cal: dict, A: float, scores, anomalous, heat, masks) -> dict:
    """Decisions p <= A and masks heat > tau_A(maxima) against the truth: the false-alarm rate on normal
    images, the detection rate on defective ones, pixel precision and recall (None: no such image/pixel,
    or masks None: no ground truth)."""
    flagged = p_values(cal["scores"], scores) <= A
    px = heat > conformal_threshold(cal["maxima"], A)
    gt = np.zeros_like(px) if masks is None else masks.astype(bool)
    hits = int((px & gt).sum())
    normal, defective = flagged[anomalous == 0], flagged[anomalous == 1]
    return dict(false_alarm_rate=float(normal.mean()) if normal.size else None,
                detection_rate=float(defective.mean()) if defective.size else None,
                pixel_precision=hits / int(px.sum()) if px.any() and masks is not None else None,
                pixel_recall=hits / int(gt.sum()) if gt.any() else None)


# ----------------------------------------------------------------------------
# Export: the whole scorer of one category as one torch.export archive (.pt2) that runs with torch
# alone. Its module takes uint8 images (B, 3, S, S) at the model's size S, any B >= 1, and returns
# anomalib's fields: pred_score (B,), anomaly_map (B, S, S) and, calibrated, p_value (B,), pred_label
# (B,) and pred_mask (B, S, S). Under the noise rule every image is scored with the same K noises, so
# they are buffers; the loop over paths is unrolled; the calibration is a sorted buffer the p-value
# counts in. Resizing stays outside (README, "Deploying"). The archive's metadata.json says what it
# holds, and every export is loaded back and checked against the scorer above before it is kept.

EXPORT_FORMAT = "flow-mismatch export 1"
EXPORT_RULE = ("score", "K", "T", "aggregator", "weight", "image_score", "seed")  # what an archive fixes
ARCHIVE_PLAIN = ("archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id")


class WholeScorer(nn.Module):
    """Normalisation, Eqs. (2)-(4) with K fixed noises and T fixed times, S and, given a calibration
    cal and a rate A, the conformal p-value, decision and mask, as one module of one category."""

    def __init__(self, model: UNet, cfg: ScoreConfig, mean, std, label, size: int, cal=None, A=None):
        super().__init__()
        self.model, self.label, self.rank, self.rule, self.A = model, label, aggregator_rank(cfg.aggregator, cfg.K), \
            cfg.image_score, A
        t = interior_times(cfg.T)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("x0", torch.cat([path_noise(cfg.seed, [0], k, (3, size, size), "cpu")
                                              for k in range(cfg.K)]))  # (K, 3, S, S)
        self.register_buffer("t", t)
        self.register_buffer("w", WEIGHTS[cfg.weight](t))
        if cal is not None:
            self.register_buffer("calib", torch.tensor(sorted(cal["scores"]), dtype=torch.float64))
            self.register_buffer("tau", torch.tensor(conformal_threshold(cal["maxima"], A)))

    def forward(self, images):  # uint8 (B, 3, S, S)
        y = (images.float() / 255 - self.mean) / self.std  # as normalise
        B, T = y.shape[0], len(self.t)  # len(y) would fix B at export
        t = self.t.view(T, 1).expand(T, B).reshape(-1)  # (T*B,) time-major
        ys = y.repeat(T, 1, 1, 1)  # (T*B, 3, S, S)
        labels = None if self.label is None else torch.full_like(t, self.label, dtype=torch.long)
        z = []
        for x0 in self.x0:  # one path at a time, unrolled
            xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * ys  # Eq. (2)
            z.append((self.model(xt, t, labels) - (ys - x0)).square().sum(1))  # Eq. (3): Z_t^(k), (T*B, S, S)
        z = torch.stack(z)  # (K, T*B, S, S)
        delta = z.mean(0) if self.rank is None else z.sort(0).values[self.rank - 1]  # Eq. (3) over paths
        heat = (self.w.view(-1, 1, 1, 1) * delta.view(T, B, *delta.shape[1:])).mean(0)  # Eq. (4), (B, S, S)
        s = image_score(heat, self.rule)
        out = dict(pred_score=s, anomaly_map=heat)
        if self.A is not None:  # p_values and conformal_threshold, in torch
            p = (1 + (self.calib >= s.double()[:, None]).sum(1)).double() / (len(self.calib) + 1)
            out.update(p_value=p, pred_label=p <= self.A, pred_mask=heat > self.tau)
        return out


def export_program(module: WholeScorer, images) -> torch.export.ExportedProgram:
    """torch.export of the module for any batch B >= 1 (traced on two of the uint8 `images`), without
    the sample inputs, which the archive would hold pickled."""
    with torch.no_grad():
        program = torch.export.export(module.eval(), (images[:2].repeat(2 // min(2, len(images)), 1, 1, 1),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=2**20)},))
    program.example_inputs = None
    return program


def check_archive(path) -> dict:
    """metadata.json of an export archive, after checking that its entries hold no pickle: JSON,
    plain text, empty sample inputs and the raw tensor bytes its configs list as not pickled. Anything
    else refuses the file: torch.export.load unpickles what it finds, without weights_only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--ckpt: no archive at {path}")
    refuse = f"--ckpt: {path} refused: its entry %s is not plain data (loading it could run code)"
    try:
        with zipfile.ZipFile(path) as z:
            entries = {name.split("/", 1)[-1]: z.read(name) for name in z.namelist() if not name.endswith("/")}
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"--ckpt: {path} is not a readable export archive ({str(e)[:80]})")
    raw = set()
    for name, body in entries.items():
        if name.startswith(("data/weights/", "data/constants/")) and name.endswith("_config.json"):
            try:
                config = json.loads(body)["config"].values()
                if any(c.get("use_pickle", True) for c in config):
                    raise ValueError("pickled")
                raw |= {name.rsplit("/", 1)[0] + "/" + c["path_name"] for c in config}
            except (ValueError, KeyError, AttributeError, TypeError):
                raise UserError(refuse % name)
    for name, body in entries.items():
        if not (name.endswith(".json") or name in ARCHIVE_PLAIN or name in raw
                or (name.startswith("data/sample_inputs/") and not body)):
            raise UserError(refuse % name)
    try:
        meta = json.loads(entries["extra/metadata.json"])
        if meta["format"] != EXPORT_FORMAT:
            raise ValueError(meta["format"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"--ckpt: {path} is not a flow-mismatch export (no metadata.json of format "
                        f"{EXPORT_FORMAT!r}); write one with: export --ckpt RUN/ckpt.pt")
    return meta


def parity_images(detector: Detector, ckpt_path, cal, category, data) -> torch.Tensor:
    """The images an export is checked on: --data, else the calibration's or the run's hold-out."""
    if data is not None:
        files = image_files(Path(data)) if Path(data).is_dir() else []
        if not files:
            raise UserError(f"--data: {data} is not a folder of images")
        return uint8_batch([a for a, _ in _load(files, detector.size)])
    record = cal or (detector.ckpt.get("calibration") or {}).get(category) or \
        (detector.ckpt.get("held_out") or {}).get(category)
    if not record or not record.get("paths"):
        raise UserError(f"--data: give a folder of images to check the archive on; {ckpt_path} records no "
                        f"calibration or hold-out images of {category}")
    return bound_images(record, detector.size)


def export(ckpt, out=None, category=None, alarm_rate=None, cfg: ScoreConfig = ScoreConfig(), data=None,
           log=print, aoti=False) -> dict:
    """Write the archive of `category` to `out` (default RUN/<category>.pt2), saved from the program that
    passed parity on the parity images, with the figures in its metadata; with aoti, also the program's
    AOTInductor package beside it (OUT.aoti.pt2), checked the same way. Returns the metadata."""
    if aoti and not any(c and shutil.which(c) for c in torch._inductor.config.cpp.cxx):  # $CXX, else g++
        raise UserError("--aoti: no C++ compiler on PATH (inductor builds with $CXX, else g++); install one "
                        "or export without --aoti")
    ckpt_path, alarm_rate = Path(ckpt), check_knob(ALARM_RATE, alarm_rate)
    detector = Detector(load_checkpoint(ckpt_path), ckpt_path, "cpu")
    if detector.geometry[2]:
        raise UserError(f"--ckpt: {ckpt_path} is tiled (train --tile); export holds one model-size input, so "
                        f"score tiled checkpoints from the checkpoint")
    if cfg.score != "mismatch":
        raise UserError(f"--score: export holds the mismatch scorer (Eqs. 2-4), not {cfg.score}")
    names, given = detector.categories, category
    category = category or (names[0] if len(names) == 1 else None)
    if category not in names:
        raise UserError(f"--category: give one of {names}; an archive holds one category")
    out = Path(out or ckpt_path.parent / f"{category}.pt2")
    if out.suffix != ".pt2" or out.is_dir():
        raise UserError(f"--out: {out} must be a file ending in .pt2")
    package = out.with_name(out.stem + ".aoti.pt2")
    if aoti:
        check_target(package, "--aoti")
    check_out_dir(out.parent)
    label = category_label(detector.ckpt, given if len(names) == 1 else category)  # warns only of what was given
    cfg = replace(cfg, precision="fp32")
    cal = None if alarm_rate is None else calibration_of(detector.ckpt, category, cfg, ckpt_path, alarm_rate)
    images = parity_images(detector, ckpt_path, cal, category, data)
    t0 = time.perf_counter()
    model = model_from_checkpoint(detector.ckpt, ckpt_path).eval()  # NCHW: the archive's weights contiguous
    program = export_program(WholeScorer(model, cfg, detector.mean, detector.std, label, detector.size, cal, alarm_rate),
                             images)
    meta = export_metadata(detector, ckpt_path, category, cfg, cal, alarm_rate)
    with tempfile.TemporaryDirectory() as tmp:
        torch.export.save(program, Path(tmp) / out.name, extra_files={"metadata.json": json.dumps(meta)})
        meta["export_s"] = time.perf_counter() - t0
        meta["parity"] = parity(Archive(Path(tmp) / out.name), detector, cfg, images, label, cal, alarm_rate)
        if aoti:
            meta["aoti"] = aoti_package(program, images, Path(tmp) / package.name)
            meta["aoti"]["parity"] = parity(Package(Path(tmp) / package.name), detector, cfg, images, label, cal,
                                            alarm_rate)
        with run_lock(out.parent, "--out", "export", wait=True):
            if aoti:
                with open(Path(tmp) / package.name, "rb") as src, atomic_write(package, "wb") as f:
                    shutil.copyfileobj(src, f)
            with atomic_write(out, "wb") as f:
                torch.export.save(program, f, extra_files={"metadata.json": json.dumps(meta, indent=1)})
    meta["file_bytes"] = out.stat().st_size
    say_export(out, package if aoti else None, meta, cal is not None, log)
    return meta


def export_metadata(detector: Detector, ckpt_path: Path, category, cfg: ScoreConfig, cal, alarm_rate) -> dict:
    """What an archive's metadata.json says of it, before its timings and parity figures."""
    return dict(format=EXPORT_FORMAT, category=category, image_size=detector.size, mean=detector.ckpt["mean"],
                std=detector.ckpt["std"], rule={f: getattr(cfg, f) for f in EXPORT_RULE}, precision="fp32",
                alarm_rate=alarm_rate, calibration_size=None if cal is None else len(cal["scores"]),
                calibration_scores=None if cal is None else cal["scores"],
                mask_threshold=None if cal is None else conformal_threshold(cal["maxima"], alarm_rate),
                ckpt=str(ckpt_path.resolve()), ckpt_sha256=hashlib.sha256(ckpt_path.read_bytes()).hexdigest(),
                step=detector.ckpt["step"], torch=torch.__version__,
                inputs="uint8 (B, 3, S, S), RGB, resized to S x S (Pillow bilinear)",
                outputs=["pred_score", "anomaly_map"] + ["p_value", "pred_label", "pred_mask"] * (cal is not None))


def say_export(out: Path, package, meta: dict, calibrated: bool, log) -> None:
    """The lines export prints: what it wrote, how long it took and its parity figures."""
    p = meta["parity"]
    log(f"wrote {out} ({meta['file_bytes'] / 1e6:.2f} MB, exported in {meta['export_s']:.1f} s); parity with the "
        f"scorer on {p['images']} images at batches 1 and {p['batch']}: maps {p['map_max_rel_diff']:.1e}, scores "
        f"{p['score_max_rel_diff']:.1e} relative" + (f"; decisions by the calibration's rule, {p['labels_differing_at_ties']} "
        f"label(s) and {p['mask_pixels_differing_at_ties']} mask pixel(s) differing at ties" if calibrated else ""))
    if package is not None:
        a, p = meta["aoti"], meta["aoti"]["parity"]
        log(f"wrote {package} ({package.stat().st_size / 1e6:.2f} MB, compiled in {a['compile_s']:.1f} s); parity "
            f"with the scorer: maps {p['map_max_rel_diff']:.1e}, scores {p['score_max_rel_diff']:.1e} relative"
            + (f", decisions by the calibration's rule: {p['decisions_by_rule']}" if calibrated else ""))


# An AOTInductor package holds checks of its input's dtype, shape and strides in its generated code;
# they run only when the process has AOTI_RUNTIME_CHECK_INPUTS=1 when the package is first called
# (torch/_inductor/codegen/cpp_wrapper_cpu.py; torch 2.13 has no compile-time switch), so Package sets
# it and the README says to. The batch's lower bound is left unchecked (aot_inductor.check_lowerbound):
# export records B >= 2 however Dim says min=1, and B = 1 must run.
AOTI_CHECKS = "AOTI_RUNTIME_CHECK_INPUTS"


def aoti_package(program: torch.export.ExportedProgram, images, path: Path) -> dict:
    """Compile the exported program into an AOTInductor package at `path` (inductor wants sample
    inputs: two of the uint8 `images`, dropped again for the archive); what metadata.json says of it."""
    t0 = time.perf_counter()
    program.example_inputs = ((images[:2].repeat(2 // min(2, len(images)), 1, 1, 1),), {})
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                 inductor_configs={"aot_inductor.check_lowerbound": False})
    finally:
        program.example_inputs = None
    return dict(file=path.name, compile_s=time.perf_counter() - t0, input_checks=f"{AOTI_CHECKS}=1")


class Package:
    """An export's AOTInductor package behind Archive's run(images), its input checks on (AOTI_CHECKS)."""

    def __init__(self, path):
        os.environ[AOTI_CHECKS] = "1"  # read once, at the package's first call
        self.runner = torch._inductor.aoti_load_package(str(path))

    def run(self, images) -> dict:
        with torch.no_grad():
            return self.runner(images)


def parity(archive, detector: Detector, cfg: ScoreConfig, images, label, cal, A) -> dict:
    """How the archive's outputs differ from score_dataset's at batch 1 and at up to 16 images per
    call. UserError (status 1) unless maps and scores agree to 1e-5 relative and the archive's p-values,
    decisions and masks are exactly p_values' and the thresholds' on its own maps and scores. A decision
    can then differ from the scorer's only where the scorer's number lies within 1e-5 of the threshold:
    such ties are counted (on calibration images one image's score is the threshold itself)."""
    data = Dataset(images, torch.zeros(len(images), dtype=torch.long), [], [""] * len(images))
    heat, scores = score_dataset(detector.model, data, cfg, detector.mean, detector.std, detector.device, label)
    batch, runs = min(16, len(images)), []
    for b in (1, batch):
        got = [archive.run(images[i:i + b]) for i in range(0, len(images), b)]
        runs.append({k: torch.cat([g[k] for g in got]) for k in got[0]})
    got = {k: torch.stack([r[k] for r in runs]) for k in runs[0]}  # (2, N, ...): at batch 1, at `batch`
    h, s = got["anomaly_map"], got["pred_score"]
    figures = dict(images=len(images), batch=batch, map_max_rel_diff=float(  # an all-zero map: 0 / tiny, not 0 / 0
        ((h - heat).abs().flatten(2).amax(2) / heat.flatten(1).amax(1).clamp_min(1e-30)).max()),
        score_max_rel_diff=float(((s - scores).abs() / scores.abs().clamp_min(1e-30)).max()))
    if cal is not None:
        tau, p = conformal_threshold(cal["maxima"], A), p_values(cal["scores"], s.numpy())
        decided = torch.from_numpy(p_values(cal["scores"], scores.numpy()) <= A)  # the scorer's decisions
        same = np.array_equal(got["p_value"].numpy(), p) and np.array_equal(got["pred_label"].numpy(), p <= A)
        figures.update(decisions_by_rule=same and torch.equal(got["pred_mask"], h > tau),
                       labels_differing_at_ties=int((decided != got["pred_label"]).sum()),
                       mask_pixels_differing_at_ties=int(((heat > tau) != got["pred_mask"]).sum()))
    agree = figures.get("decisions_by_rule", True)
    if not (figures["map_max_rel_diff"] <= 1e-5 and figures["score_max_rel_diff"] <= 1e-5 and agree):  # NaN fails
        raise UserError(f"export: the archive disagrees with the scorer ({figures}); nothing written", status=1)
    return figures


# ----------------------------------------------------------------------------
# Explain: inside the scorer for one image; the per-time maps that Eq. (4) averages into H.

def explain_maps(model, y, label=None, cfg: ScoreConfig = ScoreConfig(), tile=0, grid=0) -> dict:
    """The scorer's intermediate quantities for one normalised image y (1, C, H, W):
    maps (T, H, W) = w(t) delta_t from mismatch_delta, whose mean over t is heat, the H of
    mismatch_heat; S; x_t of path 0 at every t; and, at the time t* contributing most to H's
    peak pixel, delta_t* under cfg's aggregator (min) and under the mean over the K paths.
    With tile > 0 every delta is stitched from tiles as the tiled scorer does (x_t then shows one
    noise image over the whole picture, not the tiles' own)."""
    t = interior_times(cfg.T, y.device)
    w = WEIGHTS[cfg.weight](t).view(1, -1, 1, 1)

    def delta_of(c):  # (1, T, H, W)
        def fn(x, places, cells=None):
            labels = position_labels(None if label is None else torch.full((len(x),), label), cells, grid)
            return mismatch_delta(model, x, None if labels is None else labels.to(y.device), c, places,
                                  **run_options(c, model, x))

        if not tile:
            return fn(y, None)
        per_call = max(1, forward_batch(c, model, y[:, :, :tile, :tile]) // (c.K * c.T))
        return tiled_maps(fn, [y[0]], tile, c.stride or tile // 2, per_call, grid=grid)[0][None].to(y.device)

    delta = delta_of(cfg)
    maps = w * delta
    heat = smooth_maps(maps.mean(1), cfg.smooth).to(y.device)  # Eq. (4), as in mismatch_heat; --smooth as score_dataset
    peak = np.unravel_index(int(heat[0].argmax()), heat.shape[1:])
    j = int(maps[0, :, peak[0], peak[1]].argmax())
    x0 = path_noise(cfg.seed, [0], 0, y.shape[1:], y.device)
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * y  # Eq. (2) along path 0, (T, C, H, W)
    mean = delta_of(replace(cfg, aggregator="mean"))[0, j]
    return dict(t=t.cpu(), w=w.flatten().cpu(), maps=maps[0].cpu(), heat=heat[0].cpu(),
                score=float(image_score(heat, cfg.image_score)[0]), peak=peak, t_star=j, xt=xt.cpu(),
                spread={cfg.aggregator: delta[0, j].cpu(), "mean": mean.cpu()})


def explain_figure(e: dict, image: np.ndarray, mask, mean, std, shown: list, share: np.ndarray, title: str):
    """The figure of write_explain: image, x_t at the times `shown`, H; each time's map; the spread over K."""
    from matplotlib.figure import Figure

    T = len(e["t"])
    rows = -(-T // 10)  # w(t) delta_t in rows of at most 10
    cols = -(-T // rows)
    width = max(cols, 3 + len(shown), 7)
    fig = Figure(figsize=(1.7 * width, 2.1 * (2 + rows)), layout="constrained")
    top, middle, bottom = fig.subfigures(3, 1, height_ratios=[1, rows, 1.1])

    def show(ax, a, title, **kw):
        ax.set_axis_off()
        im = ax.imshow(a, **kw)
        if mask is not None:
            ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.6)
        ax.set_title(title, fontsize=8)
        return im

    heat, maps, aggregator = e["heat"].numpy(), e["maps"].numpy(), next(iter(e["spread"]))
    axes = top.subplots(1, 3 + len(shown))
    show(axes[0], image, "image y" + " (mask: cyan)" * (mask is not None))
    for ax, j in zip(axes[1:], shown):
        x = (e["xt"][j] * std.view(-1, 1, 1) + mean.view(-1, 1, 1)).clamp(0, 1).permute(1, 2, 0).numpy()
        show(ax, x, f"x_t, path 0, t={e['t'][j]:.2f}")
    im = show(axes[-2], heat, f"heatmap H, S = {e['score']:.4g}", cmap=COLOURS)
    axes[-2].plot(e["peak"][1], e["peak"][0], "+", color="lime", ms=10, mew=1.5)
    show(axes[-1], image, "H over the image")
    axes[-1].imshow(heat, cmap=COLOURS, alpha=0.55)
    top.colorbar(im, ax=axes[-2:], shrink=0.8, label="H").ax.tick_params(labelsize=7)
    hi = float(maps.max())
    grid = list(middle.subplots(rows, cols, squeeze=False).flat)
    for ax in grid[T:]:
        ax.remove()
    for j, ax in enumerate(grid[:T]):
        im = show(ax, maps[j], f"w·δ, t={e['t'][j]:.2f}\n{100 * share[j]:.0f}% of H", cmap=COLOURS, vmin=0, vmax=hi)
    middle.colorbar(im, ax=middle.axes, shrink=0.8, label="w(t) δ_t, one scale").ax.tick_params(labelsize=7)
    low, avg = e["spread"][aggregator].numpy(), e["spread"]["mean"].numpy()
    ts, top_value = f"t={e['t'][e['t_star']]:.2f}", float(avg.max())
    left, right = bottom.subfigures(1, 2, width_ratios=[3.4, max(2.0, width - 3.4)])
    trio = left.subplots(1, 3)
    for ax, a, what in zip(trio, (low, avg, avg - low), (f"δ_t, {aggregator} over K", "δ_t, mean over K",
                                                          f"mean - {aggregator}")):
        im = show(ax, a, f"{what}, {ts}", cmap=COLOURS, vmin=0, vmax=top_value)
    left.colorbar(im, ax=trio, shrink=0.8, label="δ_t").ax.tick_params(labelsize=7)
    ax = right.subplots()
    ax.plot(e["t"], maps.mean((1, 2)), "o-", ms=3, label="mean over pixels")
    ax.plot(e["t"], maps[:, e["peak"][0], e["peak"][1]], "s-", ms=3, label="at H's peak (+)")
    ax.set(xlabel="t", ylabel="w(t) δ_t", yscale="log")
    ax.set_title("w(t) δ_t against t: which times carry the evidence", fontsize=8)
    ax.legend(fontsize=7)
    ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9)
    return fig


def write_explain(out: Path, e: dict, image: np.ndarray, mask, mean, std, about: dict) -> dict:
    """One figure of explain_maps's output to `out`, the numbers of each panel to out.json (returned)
    and its maps to out.npz. image: (H, W, 3) uint8; mask: (H, W) bool or None; mean, std: (3,)."""
    heat, maps, T = e["heat"].numpy(), e["maps"].numpy(), len(e["t"])
    shown = sorted({round(i) for i in np.linspace(0, T - 1, 4)})
    share = maps.sum((1, 2)) / max(float(maps.sum()), 1e-30)  # (T,): each time's part of H
    fig = explain_figure(e, image, mask, mean, std, shown, share, f"{about['image']}: S = {e['score']:.4g}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as f:
        fig.savefig(f, format=out.suffix[1:].lower(), dpi=80)

    def stats(a):
        return dict(max=float(a.max()), mean=float(a.mean()), at_peak=float(a[e["peak"]]))

    numbers = dict(about, score=e["score"], heat=dict(stats(heat), peak=list(map(int, e["peak"]))),
                   xt=dict(path=0, t=[float(e["t"][j]) for j in shown]),
                   times=[dict(t=float(e["t"][j]), w=float(e["w"][j]), share_of_H=float(share[j]),
                               **stats(maps[j])) for j in range(T)],
                   spread=dict(t=float(e["t"][e["t_star"]]), **{a: stats(m.numpy()) for a, m in e["spread"].items()}),
                   arrays=out.with_suffix(".npz").name)
    if mask is not None:
        numbers["heat_in_mask"] = dict(inside=float(heat[mask].mean()) if mask.any() else None,
                                       outside=float(heat[~mask].mean()) if (~mask).any() else None)
    write_text(out.with_suffix(".json"), json.dumps(numbers, indent=2))
    with atomic_write(out.with_suffix(".npz"), "wb") as f:
        np.savez_compressed(f, t=e["t"].numpy(), maps=maps, heat=heat, xt=e["xt"].numpy(),
                            **{f"delta_{a}": m.numpy() for a, m in e["spread"].items()})
    return numbers


def explain(ckpt, image, out, cfg: ScoreConfig = ScoreConfig(), mask=None, category=None, device="auto") -> dict:
    """Explain one image file: the figure `out` (.png, .pdf or .svg), out.json and out.npz of
    write_explain; mask: its ground-truth mask file, drawn as a contour. Returns out.json's numbers."""
    out, image = Path(out), Path(image)
    if cfg.score != "mismatch":
        raise UserError(f"--score: explain shows the scorer of Eqs. 2-4 (mismatch), not {cfg.score}")
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise UserError(f"--out: {out} must end in .png, .pdf or .svg")
    if out.is_dir():
        raise UserError(f"--out: {out} is a folder")
    check_out_dir(out.parent)
    names = [out.name, out.with_suffix(".json").name, out.with_suffix(".npz").name]
    for name in names:
        check_paths({"--out": out.parent / name}, {"image": image, "--mask": mask, "--ckpt": ckpt})
    check_ours(out.parent, names)
    if not image.is_file():
        raise UserError(f"{image}: no such image file")
    detector = load(ckpt, device)
    label, cfg = category_label(detector.ckpt, category), detector.fit(cfg)
    size, scale, tile = detector.geometry
    [(arr, original)] = _load([image], size, scale=scale, tile=tile)
    truth = None
    if mask is not None:
        if not Path(mask).is_file():
            raise UserError(f"--mask: no such file {mask}")
        m, msize = read_image(Path(mask), size, mode="mask", scale=scale)  # any mask encoding, as `test` reads it
        if msize != original:
            raise UserError(f"--mask: {mask} is {msize[0]}x{msize[1]} but {image} is {original[0]}x{original[1]}")
        truth = m > 0
    y = normalise(uint8_batch([arr]).to(detector.device), detector.mean, detector.std)
    e = explain_maps(detector.model, y, label, cfg, tile, detector.grid)
    about = dict(image=str(image), mask=None if mask is None else str(mask), ckpt=str(ckpt), category=category,
                 image_size=size, tile=tile, tile_scale=scale, K=cfg.K, T=cfg.T, aggregator=cfg.aggregator,
                 weight=cfg.weight, seed=cfg.seed, image_score=cfg.image_score)
    with own_files(out.parent, names, "--out", "explain"):
        return write_explain(out, e, arr, truth, detector.mean, detector.std, about)


# ----------------------------------------------------------------------------
# Speed: the batched scorer against a naive loop over (k, t), on the same weights and images.

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0}


def strided_attention(self: Attention, x, emb=None):
    """Attention.forward as first written: 1x1 convolutions over (B, C, L), so q, k, v are strided
    along channels (stride L) and the fused attention kernels refuse them. The baseline ("before")
    that `bench` times the U-Net against, and the reference of the attention's equality test."""
    B, C, H, W = x.shape
    qkv = self.qkv(self.norm(x).reshape(B, C, H * W))  # (B, 3C, L)
    q, k, v = qkv.reshape(B, 3, self.heads, C // self.heads, H * W).transpose(3, 4).unbind(1)
    h = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(B, C, H * W)
    return x + self.proj(h).reshape(B, C, H, W)


def with_strided_attention(model: UNet) -> UNet:
    """A copy of `model` whose attention layers run strided_attention."""
    before = copy.deepcopy(model)
    for m in before.modules():
        if isinstance(m, Attention):
            m.forward = types.MethodType(strided_attention, m)
    return before


class BF16Weights(nn.Module):
    """The U-Net with its weights cast to bf16, run on bf16 inputs outside autocast: no cast around
    each op, GroupNorm in bf16 where CUDA's autocast keeps it in fp32. Returns bf16 velocities (the
    scorer takes them to fp32). `bench --bf16-weights` times it against autocast."""

    def __init__(self, model: UNet):
        super().__init__()
        self.model, self.cfg = copy.deepcopy(model).to(torch.bfloat16), model.cfg

    def forward(self, x, t, labels=None):
        with torch.autocast(x.device.type, enabled=False):
            return self.model(x.to(torch.bfloat16), t, labels)


def graphed(model: nn.Module) -> Compiled:
    """Compiled whose every forward of the fixed batch is one CUDA graph replay (`bench --graphs`)."""
    return Compiled(model, mode="reduce-overhead")


@dataclass(frozen=True)
class BenchConfig:
    """What `bench` times, beside the preset and image size (TrainConfig) and K, T, --max-batch (ScoreConfig)."""

    images: int = knob(4, "images scored (training: the batch)", ge=1, le=4096)
    repeats: int = knob(3, "timed repeats; the fastest counts", ge=1, le=1000)
    no_naive: bool = knob(False, "skip the naive loop (slow for large K*T)")
    train: bool = knob(False, "time training steps instead (batch = --images)")
    compile: bool = knob(False, "also time the compiled U-Net (and training step)")
    export: bool = knob(False, "also time the whole scorer exported (torch.export, as `export` writes it) against "
                               "eager, with the export time and the archive's size")
    layout: str = knob("auto", "memory layout; auto: channels_last for training and CPU scoring, NCHW for GPU "
                               "scoring", choices=("auto", "channels_last", "nchw"))
    bf16_weights: bool = knob(False, "also time the U-Net with its weights in bf16 (with --compile, compiled too)")
    graphs: bool = knob(False, "also time the U-Net compiled as CUDA graph replays (mode reduce-overhead; on a "
                               "CPU plain compiled code)")

    def __post_init__(self):
        check_knobs(self)


def bench(cfg: BenchConfig = BenchConfig(), preset="paper", image_size=128, score=ScoreConfig(), device="auto") -> dict:
    """Scoring (or with cfg.train, training) speed of `preset` at image_size, K, T and max_batch of `score`.

    Scoring times, in one run, each the fastest of interleaved repeats (fastest), the U-Net before the
    contiguous attention ("before"), as it is ("eager"), in the other precision and the variants cfg asks
    for (bench_score): one forward at the forward batch, the scorer's images/s on `images` images, and
    its latency (one image, K x T forwards)."""
    device = pick_device(device)
    torch.manual_seed(0)
    model = build_model(preset, 0).to(device)
    for p in model.parameters():
        if not p.any():  # undo the zero initialisations: a non-trivial output to compare
            nn.init.normal_(p, std=0.02)
    y = torch.randn(cfg.images, 3, image_size, image_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def fastest(jobs: dict, repeats=cfg.repeats) -> dict:
        """{key: seconds of the fastest of `repeats` calls of jobs[key]()}, the jobs interleaved repeat by
        repeat, so a load that comes and goes hits every job alike (and other load only adds time)."""
        best = dict.fromkeys(jobs, math.inf)
        for _ in range(repeats):
            for key, fn in jobs.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                best[key] = min(best[key], time.perf_counter() - t0)
        return best

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast(device):
        model.eval()(y[:1], torch.full((1,), 0.5, device=device))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    out = dict(device=name, preset=preset, image_size=image_size, flops=counter.get_total_flops())  # of one image
    if cfg.train:
        return bench_train(model, y, device, cfg, fastest, dict(mode="train", **out))
    return bench_score(model, y, score, device, cfg, fastest, dict(mode="score", **out), peak)


def bf16_drift(heats: dict, main: str) -> dict:
    """How far bf16 moves the numbers: the eager scorer's heats in both precisions (and, if measured,
    with the weights in bf16) against fp32, on the same images."""
    h32, h16 = (heats["eager"], heats["eager_bf16"]) if main == "fp32" else (heats["eager_fp32"], heats["eager"])
    s32, out = image_score(h32), {}
    for name, h in (("bf16", h16), ("bf16w", heats.get("eager_bf16w"))):
        if h is not None:
            s16 = image_score(h)
            out.update({f"{name}_heat_max_rel_diff": float((h - h32).abs().max() / h32.abs().max()),
                        f"{name}_score_max_rel_diff": float(((s16 - s32).abs() / s32.abs()).max()),
                        f"{name}_same_ranking": bool(torch.equal(s16.argsort(), s32.argsort()))})
    return out


def bench_score(model: UNet, y, cfg: ScoreConfig, device, bc: BenchConfig, fastest, out: dict, peak=None) -> dict:
    """The scoring figures of `bench` on images y (see there); peak: the device's dense bf16 TFLOP/s."""
    images, image_size, K, T, layout, compile = len(y), y.shape[-1], cfg.K, cfg.T, bc.layout, bc.compile
    fast = inference_model(model, device, False, None if layout == "auto" else layout == "channels_last")
    conv = next(p for p in model.parameters() if p.dim() == 4)  # the layout inference_model chose
    layout = "nchw" if conv.is_contiguous() else "channels_last"
    fb = forward_batch(cfg, model, y)
    main, other = ("bf16", "fp32") if device.type == "cuda" else ("fp32", "bf16")  # main: what "auto" runs here
    variants = {"before": (with_strided_attention(fast), main), "eager": (fast, main), f"eager_{other}": (fast, other)}
    if compile:  # one Compiled per precision: each fixes its own graph
        variants.update({"compiled": (Compiled(fast), main), f"compiled_{other}": (Compiled(fast), other)})
    if bc.bf16_weights:  # bf16 weights run outside autocast, whatever the precision
        variants["eager_bf16w"] = (BF16Weights(fast), main)
        if compile:
            variants["compiled_bf16w"] = (Compiled(variants["eager_bf16w"][0]), main)
    if bc.graphs:
        variants["graphs"] = (graphed(fast), main)
    x, t = torch.randn(fb, 3, image_size, image_size, device=device), torch.rand(fb, device=device)

    def forward(m, precision):
        with autocast(device, precision):
            return m(x, t)

    tasks = {"forward": forward, "scorer": lambda m, p: run_mismatch_heat(m, y, None, replace(cfg, precision=p)),
             "latency": lambda m, p: run_mismatch_heat(m, y[:1], None, replace(cfg, precision=p))}
    heats = {}
    with torch.no_grad():
        for v, m in variants.items():  # warm-up (compiles)
            heats[v] = tasks["scorer"](*m)
            tasks["forward"](*m)
        best = fastest({(v, task): lambda fn=fn, m=m: fn(*m)
                        for v, m in variants.items() for task, fn in tasks.items()})
    heat, sec = heats["eager"], best["eager", "scorer"]
    out.update(layout=layout, K=K, T=T, images=images, max_batch=fb, precision=main, other_precision=other,
               batched_fps=images / sec, forwards_per_s=images * K * T / sec,
               achieved_tflops=out["flops"] * images * K * T / sec / 1e12, peak_mem_bytes=peak_memory(device))
    for v in variants:
        out.update({f"{v}_forward_ms": 1e3 * best[v, "forward"], f"{v}_fps": images / best[v, "scorer"],
                    f"{v}_latency_ms": 1e3 * best[v, "latency"]})
        if v != "before":
            out.update({f"{v}_{task}_vs_before": best["before", task] / best[v, task] for task in tasks})
            out[f"{v}_max_abs_diff_vs_before"] = float((heats[v] - heats["before"]).abs().max())
    for v, c in [(v, m.compile_s) for v, (m, _) in variants.items() if isinstance(m, Compiled)]:
        e = "eager" + v.removeprefix("compiled").removeprefix("graphs")  # same precision and weights
        gain = best[e, "latency"] - best[v, "latency"]  # seconds saved per image
        out.update({f"{v}_compile_s": c, f"{v}_pays_after_images": c / gain if gain > 0 else None})
    if peak:
        out["fraction_of_bf16_peak"] = out["achieved_tflops"] / peak
    out.update(bf16_drift(heats, main))
    if bc.export:
        out.update(bench_export(model, y, replace(cfg, precision="fp32"), fastest))
    if not bc.no_naive:
        amp = run_options(cfg, model, y)["amp"]
        ref = mismatch_heat_naive(model, y, None, cfg, amp=amp)  # also the warm-up
        seconds_naive = fastest({"naive": lambda: mismatch_heat_naive(model, y, None, cfg, amp=amp)})["naive"]
        out.update(naive_fps=images / seconds_naive, speedup=seconds_naive / sec,
                   max_abs_diff=float((heat - ref).abs().max()))
    return out


def bench_export(model: UNet, y, cfg: ScoreConfig, fastest) -> dict:
    """The exported whole scorer (WholeScorer, saved and loaded back as `export` does) against the eager
    scorer (normalisation and mismatch_heat, fp32) on the same uint8 images, with the export's time and size."""
    S, mean, std = y.shape[-1], [0.5] * 3, [0.25] * 3
    images = (y.clamp(-2, 2) * 63 + 127).round().byte()  # (N, 3, S, S) uint8
    t0 = time.perf_counter()
    program = export_program(WholeScorer(model, cfg, mean, std, None, S).to(y.device), images)
    with tempfile.TemporaryDirectory() as tmp:
        torch.export.save(program, Path(tmp) / "bench.pt2")
        size = (Path(tmp) / "bench.pt2").stat().st_size
        exported = torch.export.load(Path(tmp) / "bench.pt2").module()
    export_s = time.perf_counter() - t0

    def eager(x):
        return mismatch_heat(model, normalise(x, torch.tensor(mean), torch.tensor(std)), cfg=cfg)

    with torch.no_grad():
        heat, got = eager(images), exported(images)["anomaly_map"]
        best = fastest({"eager": lambda: eager(images), "exported": lambda: exported(images),
                        "eager_latency": lambda: eager(images[:1]), "exported_latency": lambda: exported(images[:1])})
    return dict(export_s=export_s, export_bytes=size, exported_fps=len(images) / best["exported"],
                exported_latency_ms=1e3 * best["exported_latency"], exported_vs_eager=best["eager"] / best["exported"],
                exported_latency_vs_eager=best["eager_latency"] / best["exported_latency"],
                exported_max_rel_diff=float((got - heat).abs().max() / heat.abs().max()))


def bench_train(model: UNet, y, device, bc: BenchConfig, fastest, out: dict) -> dict:
    """Training images/s (10 StableAdamW steps) at batch len(y) and, on a GPU, at the largest batch
    that fits (doubling until out of memory), eager and with bc.compile compiled, interleaved."""
    layout, compile = "nchw" if bc.layout == "nchw" else "channels_last", bc.compile
    model.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format).train()
    opt = StableAdamW(model.parameters())
    nets = {"eager": model, **({"compiled": torch.compile(model, dynamic=False)} if compile else {})}
    n_steps = 10

    def steps(net, yb, n=n_steps):
        for _ in range(n):
            with autocast(device):
                loss = cfm_loss(net, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    batches = [len(y)]
    if device.type == "cuda":  # the largest batch that fits, by doubling
        b = len(y)
        with contextlib.suppress(torch.cuda.OutOfMemoryError):
            while True:
                steps(model, y[:1].expand(2 * b, -1, -1, -1).clone(), n=1)
                b *= 2
        torch.cuda.empty_cache()
        batches.append(b)
    out.update(layout=layout, batch=len(y), batches=batches)
    for b in batches:
        yb = y[:1].expand(b, -1, -1, -1).clone() if b != len(y) else y
        jobs = {v: lambda net=net: steps(net, yb) for v, net in nets.items()}
        warm, best = fastest(jobs, 1), fastest(jobs)  # the first: a warm-up (compiles)
        if compile and b == len(y):  # the warm-up's excess over a timed repeat
            out["compile_s"] = warm["compiled"] - best["compiled"]
        for v in nets:
            fps = n_steps * b / best[v]
            out[f"{v}_train_fps_batch{b}"] = fps
            if b == len(y):
                out.update({f"{v}_train_fps": fps, f"{v}_achieved_tflops": 3 * out["flops"] * fps / 1e12})
    out.update(train_fps=out["eager_train_fps"], peak_mem_bytes=peak_memory(device))
    return out


def peak_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # whole process, Linux KiB


# ----------------------------------------------------------------------------
# The paper's numbers ("Ours", percent, in METRICS order): the mean rows of Table 1 and the
# per-category MVTec-AD rows of Tables 4 (image) and 5 (pixel).

PAPER = {
    "mvtec": {
        MEAN: (98.7, 99.5, 97.7, 97.7, 67.5, 64.8, 91.9),
        "bottle": (99.1, 99.7, 97.6, 97.8, 76.8, 69.9, 93.0),
        "cable": (93.2, 96.6, 90.8, 95.1, 51.8, 51.3, 82.1),
        "capsule": (97.4, 99.5, 96.4, 97.9, 48.5, 51.5, 94.0),
        "carpet": (95.4, 98.7, 93.0, 97.2, 70.0, 67.6, 83.3),
        "grid": (100.0, 100.0, 100.0, 99.4, 55.7, 55.1, 96.4),
        "hazelnut": (99.9, 99.9, 99.3, 99.1, 69.2, 70.1, 89.7),
        "leather": (100.0, 100.0, 100.0, 99.7, 68.8, 66.9, 98.9),
        "metal_nut": (99.8, 100.0, 99.5, 97.3, 85.5, 79.1, 93.5),
        "pill": (99.3, 99.9, 98.9, 99.3, 84.2, 77.3, 97.2),
        "screw": (97.8, 99.2, 96.7, 99.4, 55.3, 54.1, 96.9),
        "tile": (99.9, 100.0, 99.4, 94.8, 74.4, 68.1, 82.5),
        "toothbrush": (99.4, 99.8, 98.4, 99.2, 63.5, 65.4, 94.8),
        "transistor": (99.7, 99.6, 97.5, 93.7, 58.1, 56.1, 88.7),
        "wood": (99.3, 99.8, 98.4, 95.7, 70.9, 65.4, 91.4),
        "zipper": (99.9, 100.0, 99.6, 99.1, 79.3, 74.2, 96.8),
    },
    "visa": {MEAN: (98.0, 98.4, 95.2, 97.5, 40.2, 45.8, 90.6)},
}


PAPER_CATEGORIES = {  # what the paper's mean rows average over
    "mvtec": tuple(name for name in PAPER["mvtec"] if name != MEAN),
    "visa": ("candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
             "pcb4", "pipe_fryum"),
}


def mean_coverage(results: dict, dataset: str):
    """None if our mean averages every metric over exactly the paper's categories, else the row
    label that says over what: `ours (k/n)`, k the fewest of the paper's n categories a metric has,
    `+m other` for categories not in the paper's mean."""
    paper = set(PAPER_CATEGORIES[dataset])
    have = [{name for name, m in results.items() if name != MEAN and m[k] is not None} for k in METRICS]
    if all(h == paper for h in have):
        return None
    k, other = min(len(h & paper) for h in have), len(set().union(*have) - paper)
    return f"ours ({k}/{len(paper)}{f', +{other} other' if other else ''})"


def compare(results: dict, dataset: str) -> str:
    """Our metrics beside the paper's for the categories both have: rows ours, paper, ours - paper.
    A mean that is not over the paper's categories is labelled as such (mean_coverage)."""
    rows = []
    for name in [n for n in results if n in PAPER[dataset]]:
        paper, ours = PAPER[dataset][name], [results[name][k] for k in METRICS]
        ours = [None if v is None else 100 * v for v in ours]
        diff = [None if o is None else o - p for o, p in zip(ours, paper)]
        ours_label = (name == MEAN and mean_coverage(results, dataset)) or "ours"
        for label, values in ((ours_label, ours), ("paper", paper), ("ours - paper", diff)):
            rows.append(["mean" if name == MEAN else name, label,
                         *("n/a" if v is None else f"{v:.1f}" for v in values)])
    return table(["category", "", *METRICS], rows)


# ----------------------------------------------------------------------------
# From Python: the functions every command calls. fm.load(ckpt).predict(images) scores images on
# disk or in memory; train, evaluate (`test`), calibrate and score write what the commands write.

@dataclass
class Prediction:
    """Detector.predict's answer, with the field names of anomalib."""

    pred_score: np.ndarray  # (N,) image scores S (Eq. 4)
    anomaly_map: list  # N float32 heatmaps H, each at its image's original size (bilinear)
    image_path: list  # N paths; None for an image given in memory
    p_value: np.ndarray = None  # with an alarm rate A: (N,) conformal p-values
    pred_label: np.ndarray = None  # (N,) bool, p <= A: anomalous at false-alarm rate A
    pred_mask: list = None  # N bool defect masks at the original size: H > tau_A of the maxima


def image_inputs(images, listed=False):
    """(image, path or None) per image of a path, folder, PIL image, uint8 (H, W, 3) or (N, H, W, 3)
    array, float tensor in [0, 1] of shape (3, H, W) or (N, 3, H, W), or a list of any of these (listed:
    an item of one, where a path gone since it was listed is left to the reader to name and skip)."""
    from PIL import Image

    if isinstance(images, (str, os.PathLike)):
        target = Path(images)
        if not target.exists() and not listed:
            raise UserError(f"{target}: no such file or folder")
        files = image_files(target) if target.is_dir() else [target]
        if not files:
            raise UserError(f"{target}: holds no images")
        yield from ((f, str(f)) for f in files)
    elif isinstance(images, Image.Image):
        if 0 in images.size:
            raise UserError(f"images: a PIL image of size {images.size} holds no pixels")
        yield images, None
    elif isinstance(images, (torch.Tensor, np.ndarray)) and 0 in images.shape:
        raise UserError(f"images: {type(images).__name__} of shape {tuple(images.shape)} holds no pixels")
    elif isinstance(images, torch.Tensor):
        if not (images.is_floating_point() and images.dim() in (3, 4) and images.shape[-3] == 3 and (
                0 <= images.min() and images.max() <= 1)):
            raise UserError(f"images: a tensor must be float in [0, 1], (3, H, W) or (N, 3, H, W), not "
                            f"{images.dtype} {tuple(images.shape)}")
        yield from image_inputs((images.reshape(-1, *images.shape[-3:]) * 255).round().byte().permute(0, 2, 3, 1)
                                .cpu().numpy())
    elif isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
            raise UserError(f"images: an array must be uint8 (H, W, 3) or (N, H, W, 3), not {images.dtype} "
                            f"{images.shape}")
        yield from ((Image.fromarray(a), None) for a in images.reshape(-1, *images.shape[-3:]))
    elif isinstance(images, (list, tuple)):
        for item in images:
            yield from image_inputs(item, listed=True)
    else:
        raise UserError(f"images: cannot read a {type(images).__name__}")


def category_label(ckpt, category):
    """The class label of `category` for a class-conditional model; None for an unconditional
    one, where a category it was not trained on is an error and any other is said to do nothing."""
    names = ckpt["class_names"]
    if ckpt["conditional"]:
        if category not in names:
            raise UserError(f"give one of {names} for this class-conditional model", keyword="category")
        return names.index(category)
    if category is not None:
        if category not in names:
            raise UserError(f"{category!r} is not what this model was trained on ({', '.join(names)})",
                            keyword="category")
        note(f"warning: --category {category} has no effect: the model is unconditional (trained on {', '.join(names)})")
    return None


def image_chunks(images, chunk: int, geometry, skip=False, progress=None):
    """Datasets of at most `chunk` of `images` (image_inputs), each read when it is needed, as a model
    of `geometry` (image_geometry) reads them. With skip, an unreadable file is named, left out and
    counted as done."""
    (size, scale, tile), inputs = geometry, image_inputs(images)
    while items := list(itertools.islice(inputs, chunk)):
        read = [(r, p) for r, (_, p) in zip(_load([x for x, _ in items], size, skip=skip, scale=scale, tile=tile),
                                            items) if r is not None]
        if progress and len(read) < len(items):  # a skipped file counts as done
            progress(len(items) - len(read))
        if not read:
            continue
        arrays = [a for (a, _), _ in read]
        yield Dataset(uint8_batch(arrays), torch.zeros(len(read), dtype=torch.long), [], [p for _, p in read],
                      np.zeros(len(read), int), [np.zeros(a.shape[:2], np.uint8) for a in arrays],
                      sizes=[s for (_, s), _ in read])


def check_chunk(chunk) -> int:
    if type(chunk) is not int or chunk < 1:
        raise UserError(f"chunk: images scored at a time must be a positive integer, got {chunk!r}")
    return chunk


class Detector:
    """A trained model ready to score, from fm.load(ckpt): in eval mode on its device, with its
    categories, training normalisation and size, and its calibration."""

    def __init__(self, ckpt: dict, path, device="auto", compile=False):
        self.ckpt, self.path = ckpt, Path(path)
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.model = inference_model(model_from_checkpoint(ckpt, path), self.device, compile)
        self.categories, self.size = ckpt["class_names"], ckpt["train_config"]["image_size"]
        self.geometry, self.grid = image_geometry(ckpt["train_config"]), ckpt["train_config"]["tile_grid"]
        self.mean, self.std = torch.tensor(ckpt["mean"]), torch.tensor(ckpt["std"])

    def fit(self, cfg: ScoreConfig) -> ScoreConfig:
        """cfg, if this model can score by it: a tiled model's --stride is at most its tile."""
        if self.geometry[2] and cfg.stride > self.geometry[2]:
            raise UserError(f"--stride: {cfg.stride} must be from 1 to the tile size {self.geometry[2]} (0: half a "
                            f"tile), or pixels go unscored")
        return cfg

    def stream(self, images, category=None, alarm_rate=None, chunk=32, skip=False, progress=None, **overrides):
        """(Prediction, data, heat) per chunk of at most `chunk` images, each read when its chunk is
        scored, so memory does not grow with the number of images; data: the chunk at the model's
        size, heat: its maps there, as score_dataset returns them. With skip, an unreadable file is
        named and left out. Every argument is checked by this call, before any image is read."""
        A, cfg = check_knob(ALARM_RATE, alarm_rate), self.fit(ScoreConfig(**overrides))
        check_chunk(chunk)
        label = category_label(self.ckpt, category)
        cal = None if A is None else calibration_of(self.ckpt, category, cfg, self.path, A)
        return (self.predicted(data, progress, A, cfg, label, cal)
                for data in image_chunks(images, chunk, self.geometry, skip, progress))

    def predicted(self, data, progress, A, cfg, label, cal) -> tuple:
        heat, scores = score_dataset(self.model, data, cfg, self.mean, self.std, self.device, label, progress,
                                     tile=self.geometry[2], grid=self.grid)
        maps = [upsample(h.numpy(), original) for h, original in zip(heat, data.sizes)]
        pred = Prediction(scores.numpy(), maps, data.paths)
        if cal is not None:
            pred.p_value = p_values(cal["scores"], pred.pred_score)
            pred.pred_label, tau = pred.p_value <= A, conformal_threshold(cal["maxima"], A)
            pred.pred_mask = [m > tau for m in maps]
        return pred, data, heat

    def predict(self, images, category=None, alarm_rate=None, chunk=32, **overrides) -> Prediction:
        """Scores, maps at the original sizes and, with a calibrated alarm_rate, decisions for `images`
        (see image_inputs); overrides: ScoreConfig fields (K=, T=, seed=, ...)."""
        parts = [p for p, _, _ in self.stream(images, category, alarm_rate, chunk, **overrides)]
        if not parts:
            raise UserError("images: no readable image")
        return Prediction(**{f.name: None if getattr(parts[0], f.name) is None else
                             (np.concatenate if f.type == "np.ndarray" else lambda v: sum(v, []))(
                                 [getattr(p, f.name) for p in parts]) for f in fields(Prediction)})


class Archive(Detector):
    """fm.load("x.pt2"): an export's program (Export) behind Detector's interface, its entries checked
    to hold no pickle before it is loaded. It scores one category with the rule and alarm rate it was
    exported with, on the CPU; self.ckpt holds what score reads of a checkpoint."""

    def __init__(self, path, device="auto"):
        self.meta, self.path = check_archive(path), Path(path)
        if pick_device(device).type != "cpu":
            note(f"{path}: an export archive runs on the CPU")
        cat, self.size, self.device, self.grid = self.meta["category"], self.meta["image_size"], torch.device("cpu"), 0
        self.program, self.categories, self.geometry = torch.export.load(self.path).module(), [cat], (self.size, 1.0, 0)
        self.mean, self.std = torch.tensor(self.meta["mean"]), torch.tensor(self.meta["std"])
        self.ckpt = dict(class_names=[cat], calibration={cat: dict(scores=self.meta["calibration_scores"])})

    def run(self, images) -> dict:
        """The program's outputs for uint8 images (B, 3, S, S)."""
        with torch.no_grad():
            return self.program(images)

    def stream(self, images, category=None, alarm_rate=None, chunk=32, skip=False, progress=None, **overrides):
        """As Detector.stream, by the program; a category, rule or alarm rate other than the archive's is refused."""
        meta, flags, A = self.meta, {f.name: f for f in fields(ScoreConfig)}, check_knob(ALARM_RATE, alarm_rate)
        check_chunk(chunk)
        ScoreConfig(**overrides)  # every value checked as its flag is
        if category not in (None, meta["category"]):
            raise UserError(f"--category: {self.path} scores {meta['category']} only")
        if A is not None and A != meta["alarm_rate"]:
            raise UserError(f"--alarm-rate: {self.path} decides at " + (
                f"{meta['alarm_rate']}, fixed when it was exported" if meta["alarm_rate"] else
                "no rate: export it with --alarm-rate"))
        for f in (*EXPORT_RULE, "smooth"):  # what changes its numbers; it holds no smoothing
            fixed = meta["rule"].get(f, getattr(ScoreConfig, f))
            if f in overrides and overrides[f] != fixed:
                flag = flag_of(flags[f])
                raise UserError(f"{flag}: {self.path} scores with {flag} {fixed}, fixed when it was exported")
        return (self.predicted(data, progress, A)
                for data in image_chunks(images, chunk, self.geometry, skip, progress))

    def predicted(self, data, progress, A) -> tuple:
        out = self.run(data.images)
        if progress:
            progress(len(data))
        heat = out["anomaly_map"]
        maps = [upsample(h.numpy(), original) for h, original in zip(heat, data.sizes)]
        pred = Prediction(out["pred_score"].numpy(), maps, data.paths)
        if A is not None:
            pred.p_value, pred.pred_label = out["p_value"].numpy(), out["pred_label"].numpy()
            pred.pred_mask = [m > self.meta["mask_threshold"] for m in maps]
        return pred, data, heat


def load(ckpt, device="auto", compile=False) -> Detector:
    """The Detector of a checkpoint file, or the Archive of an export (.pt2); neither read runs
    anything in the file."""
    if Path(ckpt).suffix == ".pt2":
        return Archive(ckpt, device)
    return Detector(load_checkpoint(ckpt), ckpt, device, compile)


def score(ckpt, images, out, cfg: ScoreConfig = None, category=None, alarm_rate=None, device="auto",
          compile=False, chunk=32, log=print) -> list:
    """Score an image or a folder of them into `out`: scores.csv (path, score and, with alarm_rate,
    p_value and anomalous; empty for an unreadable file, which is named and skipped), heatmaps/ (an
    overlay per image, one colour range: the first chunk's), maps/ (each map as a float32 TIFF at its
    image's original size, named like its overlay) and with alarm_rate masks/ (defect masks at each
    image's original size). cfg None: the defaults, or an export archive's own rule. Returns the rows
    of scores.csv."""
    out, alarm_rate = Path(out), check_knob(ALARM_RATE, alarm_rate)
    check_paths({"--out": out}, {"images": images})
    with run_lock(out, "--out", "score"):
        detector = load(ckpt, device, compile)
        files = [p for _, p in image_inputs(images)]
        check_ours(out, ["heatmaps", "maps", "scores.csv", *["masks"] * bool(alarm_rate), *STAGING])
        preds = detector.stream(files, category, alarm_rate, chunk, skip=True, progress=Progress(len(files)),
                                **asdict(cfg) if cfg else {})  # every check before anything is written
        rows, span = {}, None
        with staged(out, stale=() if alarm_rate else ("masks",)) as new:
            for pred, data, heat in preds:
                span = write_overlays(new / "heatmaps", data, [h.numpy() for h in heat], span)
                for i, path in enumerate(pred.image_path):
                    rows[path] = [pred.pred_score[i]] + ([] if pred.p_value is None else
                                                         [pred.p_value[i], int(pred.pred_label[i])])
                    save_image(new / "maps" / Path(overlay_name(path)).with_suffix(".tiff"), pred.anomaly_map[i])
                    if alarm_rate:
                        save_image(new / "masks" / overlay_name(path), pred.pred_mask[i].astype(np.uint8) * 255)
            if not rows:
                raise UserError(f"{images}: no readable image")
            table = [[str(p), *rows.get(str(p), [""] * (1 + 2 * bool(alarm_rate)))] for p in files]
            write_csv(new / "scores.csv", [["path", "score"] + ["p_value", "anomalous"] * bool(alarm_rate)] + table)
        for path, s, *_ in (r for r in table if r[1] != ""):
            log(f"{s:.6g}\t{path}")
        if alarm_rate:
            flagged = sum(r[3] for r in table if r[1] != "")
            log(f"{flagged} of {len(rows)} images anomalous at alarm rate {alarm_rate} "
                f"({len(detector.ckpt['calibration'][category or detector.categories[0]]['scores'])} calibration "
                f"images); masks in {out / 'masks'}")
        return table


def calibrate(ckpt, data=None, category=None, cfg: ScoreConfig = ScoreConfig(), device="auto", compile=False,
              log=print) -> dict:
    """Score normal images the model was not trained on (the folder `data`, or the run's own
    hold-out, each file checked against its recorded sha256) and store them in the checkpoint as
    the calibration of `category`; returns it. Scoring runs without the run folder's lock (a
    `train --resume` may run meanwhile); the result is merged into the newest checkpoint under it,
    scored again first if training moved the weights on."""
    ckpt_path = Path(ckpt)
    check_out_dir(ckpt_path.parent, "--ckpt")  # the calibration is written into the checkpoint
    for path in (ckpt_path, ckpt_path.parent / ".lock"):  # before scoring, what the lock and the write will refuse
        check_target(path, "--ckpt")
    if data is not None and not Path(data).is_dir():
        raise UserError(f"--data: {data} is not a folder")
    files = None if data is None else image_files(Path(data))
    if files == []:
        raise UserError(f"--data: {data} holds no images")
    detector = load(ckpt_path, device, compile)
    ckpt, names, cfg = detector.ckpt, detector.categories, detector.fit(cfg)
    category = category or (names[0] if len(names) == 1 else None)
    if category not in names:
        raise UserError(f"give one of {names}", keyword="category")
    size, scale, tile = detector.geometry
    if data is None:  # the run's own hold-out, e.g. rescored under other -K/-T
        record = (ckpt.get("held_out") or {}).get(category)
        if not record:
            raise UserError(f"--data: required, {ckpt_path} held out no images of {category} (train --calib-fraction)")
        images, paths = bound_images(record, size, scale), record["paths"]
    else:
        images = uint8_batch([a for a, _ in _load(files, size, scale=scale, tile=tile)])
        paths = [str(f.resolve()) for f in files]
    held = Dataset(images, torch.zeros(len(paths), dtype=torch.long), names, paths)
    check_unseen(ckpt, held, ckpt_path)
    label = names.index(category) if ckpt["conditional"] else None
    cal = calibrate_on(detector.model, held, cfg, detector.mean, detector.std, detector.device, label, ckpt["step"],
                       tile, detector.grid)
    with run_lock(ckpt_path.parent, "--ckpt", "calibrate", wait=True):
        newest = load_checkpoint(ckpt_path)  # with another calibration, or trained on
        if newest["model"].keys() != ckpt["model"].keys() or not all(
                torch.equal(v, newest["model"][k]) for k, v in ckpt["model"].items()):
            note(f"{ckpt_path} was trained on to step {newest['step']} meanwhile; scoring again on its weights")
            check_unseen(newest, held, ckpt_path)
            detector = Detector(newest, ckpt_path, detector.device, compile)
            cal = calibrate_on(detector.model, held, cfg, detector.mean, detector.std, detector.device, label,
                               newest["step"], tile, detector.grid)
        newest["calibration"] = {**(newest.get("calibration") or {}), category: cal}
        save_checkpoint(ckpt_path, newest)
    log(f"calibrated {category} on {len(paths)} normal images (smallest --alarm-rate 1/(n+1) = "
        f"{1 / (len(paths) + 1):.3g}); written to {ckpt_path}")
    return cal


# ----------------------------------------------------------------------------
# CLI: each command parses its flags, calls one function above and prints its result.

# Exit statuses: 0 done; 1 the run failed (training diverged, disk full, out of memory); 2 bad input
# or flags, nothing done; 3 `score` wrote results but skipped unreadable images; 128 + signal
# interrupted (130 Ctrl-C, 143 SIGTERM).
SKIPPED = 3
DEVICES = ("auto", "cpu", "cuda")
DEMO = dict(steps=160, image_size=64)  # the demo's training length and size
EXAMPLES = """examples:
  python flow_mismatch.py demo                                   # 2-4 min on a CPU: generated data, train, test
  python flow_mismatch.py train --data mvtec/bottle --preset tiny --out runs/bottle_tiny   # a CPU run, minutes
"""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2
        note(f"error: {message}")
        raise SystemExit(2)


def parse_knob(f, text, flag=None):
    """A flag's text as the value of config field f (a tuple: comma-separated numbers), checked by check_knob."""
    flag, kind, many = flag or flag_of(f), f.metadata["kind"], isinstance(f.default, tuple)
    try:
        value = tuple(map(kind, text.split(","))) if many else kind(text)
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not {KIND_NAMES[kind]}{' list' * many}")
    return check_knob(f, value, flag)


def knob_flags(p, cls, names=None, shown=None, helps=None):
    """A flag per field of the config dataclass cls (or per field in `names`), parsed and checked by
    its knob; --help gives its help (or helps[name]), default (or shown[name]) and range. A flag not
    given stays out of the parsed arguments, so the dataclass's own default applies (see given)."""
    for f in (f for f in fields(cls) if names is None or f.name in names):
        m = f.metadata
        rule = " and ".join(f"{BOUNDS[op][0]} {b}" for op, b in m["bounds"].items())
        about = f"{(helps or {}).get(f.name, m['help'])} (default {(shown or {}).get(f.name, f.default)}{'; ' + rule if rule else ''})"
        kind = dict(action="store_true") if m["kind"] is bool else dict(
            type=lambda text, f=f: parse_knob(f, text),
            metavar="{" + ",".join(m["choices"]) + "}" if m["choices"] else f.name.upper())
        p.add_argument(flag_of(f), dest=f.name, default=argparse.SUPPRESS, help=about, **kind)


def pixel_budget(p):
    p.add_argument("--max-pixels", type=max_pixels, metavar="N", help=f"refuse an image file declaring more than N "
                   f"pixels before decoding it (default {MAX_PIXELS:,}; Python: fm.MAX_PIXELS = N)")


def max_pixels(text) -> int:
    try:
        n = float(text)
    except ValueError:
        n = None
    if n is None or not math.isfinite(n) or n != int(n) or not 1 <= n <= 2**40:
        raise UserError(f"--max-pixels: {text!r} is not a whole number of pixels from 1 to 2^40")
    return int(n)


def scoring(p):
    knob_flags(p, ScoreConfig)
    pixel_budget(p)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net at one fixed batch (a CPU's first compile takes minutes; BENCHMARKS.md)")


def given(cls, args) -> dict:
    """The fields of config dataclass cls that were given as flags, {name: value}: what `given` means
    wherever it is a parameter (train, resumed_config, cpu_estimate)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


def cmd_train(args):
    if args.resume is None and args.data is None:
        raise UserError("--data: required (or --resume RUN_DIR)")
    flags = given(TrainConfig, args)
    if flags.get("tile") and "image_size" in flags:
        raise UserError("--image-size: has no effect with --tile, which cuts tiles at the images' own size "
                        "(--tile-scale rescales them first)")
    pick_device(args.device)
    path = train(args.data, train_config(**flags), args.resume or args.out, args.device, resume=bool(args.resume),
                 compile=args.compile, given=flags)
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"wrote {path}")


def cmd_test(args):
    cfg = ScoreConfig(**given(ScoreConfig, args))
    out = Path(args.out or Path("eval") / Path(args.ckpt[0]).resolve().parent.name)
    grid = {k.removeprefix("grid_"): v for k, v in vars(args).items() if k.startswith("grid_") and v is not None}
    if grid or len(args.ckpt) > 1:
        for flag, value in (("--alarm-rate", args.alarm_rate), ("--save-maps", args.save_maps)):
            if value is not None:
                raise UserError(f"{flag}: give it to a plain `test` of one checkpoint, not to an ablation")
        run_sweep(args.ckpt, args.data, out, cfg, grid, args.device, args.compile, eval_size=args.eval_size)
    else:
        evaluate(args.ckpt[0], args.data, out, cfg, args.device, overlays=not args.no_overlays, compile=args.compile,
                 eval_size=args.eval_size, alarm_rate=args.alarm_rate, save_maps=args.save_maps)
    print(f"wrote {out}")


def cmd_score(args):
    base = check_archive(args.ckpt)["rule"] if Path(args.ckpt).suffix == ".pt2" else {}  # an archive's rule is fixed
    cfg = ScoreConfig(**{**base, **given(ScoreConfig, args)})
    out = Path(args.out or Path("scored") / Path(args.images).resolve().name)
    rows = score(args.ckpt, args.images, out, cfg, args.category, args.alarm_rate, args.device, args.compile)
    print(f"wrote {out}")
    if args.alarm_rate is None:
        note(f"S ranks images (higher: more anomalous) on no fixed scale; for decisions, calibrate once on normal "
             f"images (calibrate --ckpt {args.ckpt} --data FOLDER_OF_GOOD_IMAGES, or train --calib-fraction 0.2) "
             f"and score with --alarm-rate 0.01 (at most 1 % of normal images flagged)")
    return SKIPPED if any(r[1] == "" for r in rows) else 0


def cmd_calibrate(args):
    calibrate(args.ckpt, args.data, args.category, ScoreConfig(**given(ScoreConfig, args)), args.device, args.compile)


def cmd_export(args):
    export(args.ckpt, args.out, args.category, args.alarm_rate, ScoreConfig(**given(ScoreConfig, args)), args.data,
           aoti=args.aoti)


def cmd_demo(args):
    cfg = train_config("tiny", calib_fraction=0.0, **{**DEMO, **given(TrainConfig, args)})
    cfg = replace(cfg, save_every=cfg.steps)
    out = Path(args.out)
    check_out_dir(out)
    pick_device(args.device)
    data = out / "data"
    with run_lock(out, "--out", "demo"):  # checks first; each part is made aside and moved in whole
        check_ours(out, ["data", "run", "eval", *STAGING])
        if not data.exists():
            with staged(out) as new:
                make_demo_dataset(new / "data", size=cfg.image_size)
        with staged(out) as new:  # the previous run stays until this one has trained
            train(data, cfg, new / "run", args.device)
        record(out, ["eval"])
        results = evaluate(out / "run" / "ckpt.pt", data, out / "eval", ScoreConfig(), args.device)
    print(f"demo: image AUROC {percent(results[MEAN]['image_auroc'])}, pixel AUROC "
          f"{percent(results[MEAN]['pixel_auroc'])}; heatmaps under {out / 'eval'}")


def cmd_explain(args):
    out = Path(args.out)
    e = explain(args.ckpt, args.image, out, ScoreConfig(**given(ScoreConfig, args)), args.mask, args.category,
                args.device)
    print(f"S = {e['score']:.6g}; wrote {out}, {out.with_suffix('.json')} and {out.with_suffix('.npz')}")


def cmd_compare(args):
    path = Path(args.metrics)
    check_out_dir(path.parent, args.metrics)
    try:
        results = json.loads(path.read_bytes())  # NaN and Infinity parse; they are refused below
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable metrics.json ({type(e).__name__})")
    if not isinstance(results, dict) or not all(isinstance(r, dict) and set(METRICS) <= set(r)
                                                for r in results.values()):
        raise UserError(f"{path}: not a metrics.json written by `test`")
    for (name, r), k in itertools.product(results.items(), METRICS):
        if r[k] is not None and (type(r[k]) not in (int, float) or not 0 <= r[k] <= 1):
            raise UserError(f"{path}: key '{name}.{k}' holds {json.dumps(r[k])[:40]}, not a number in [0, 1] or null")
    if not set(PAPER[args.dataset]) & set(results):
        raise UserError(f"{path}: no category in common with the paper's {args.dataset} rows")
    table = compare(results, args.dataset)
    partial = MEAN in results and mean_coverage(results, args.dataset)
    if partial:
        note(f"our mean is not over the paper's {len(PAPER_CATEGORIES[args.dataset])} {args.dataset} categories "
             f"({partial}); the mean rows are not like for like")
    with own_files(path.parent, [f"compare_{args.dataset}.md"], args.metrics, "compare"):
        write_text(path.parent / f"compare_{args.dataset}.md", table + "\n")
    print(table)


def cmd_bench(args):
    if args.json:
        if os.path.isdir(args.json):
            raise UserError(f"--json: {args.json} is a folder; name a file")
        check_out_dir(Path(args.json).parent, "--json")
        check_ours(Path(args.json).parent, [Path(args.json).name], "--json")
    tc, sc = train_config(**given(TrainConfig, args)), ScoreConfig(**given(ScoreConfig, args))
    r = bench(BenchConfig(**given(BenchConfig, args)), tc.preset, tc.image_size, sc, args.device)
    r.update(torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    for k, v in r.items():
        print(f"{k:>28}: {v:.4g}" if isinstance(v, float) else f"{k:>28}: {v}")
    if args.json:
        with own_files(Path(args.json).parent, [Path(args.json).name], "--json", "bench"):
            write_text(args.json, json.dumps(r, indent=2))


def train_flags(p) -> None:
    p.add_argument("--data", help="a category folder (mvtec/bottle) or a root of categories (mvtec)")
    p.add_argument("--out", help="run folder; writes RUN_DIR/ckpt.pt (default: runs/<name of the data folder>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    knob_flags(p, TrainConfig, shown={k: f"{getattr(TrainConfig, k)}; CPU presets: {v}"
                                      for k, v in CPU_RECIPES["tiny"].items()})
    pixel_budget(p)
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (BENCHMARKS.md: when it pays)")


def test_flags(p) -> None:
    p.add_argument("--ckpt", required=True, action="append",
                   help="checkpoint; repeat it for a row per checkpoint (Table 8: pooled vs conditional, "
                        "Table 9: ckpt_epochE.pt)")
    p.add_argument("--data", required=True, help="a category folder or a root of categories")
    p.add_argument("--out", help="evaluation folder (default: eval/<name of the checkpoint's run folder>)")
    p.add_argument("--no-overlays", action="store_true", help="skip the PNG overlays")
    p.add_argument("--eval-size", type=parse_eval_size,
                   help="pixel metrics on heatmaps upsampled (bilinear) to N x N, or to each image's original size "
                        "('original', as the MVTec-AD evaluation script); default: the training resolution (paper)")
    scoring(p)
    score_fields = {f.name: f for f in fields(ScoreConfig)}
    for flag, name, about in (("--scores", "score", "scorers to compare (Table 2)"),
                              ("--grid-K", "K", "values of K (Table 6)"), ("--grid-T", "T", "values of T (Table 6)"),
                              ("--aggregators", "aggregator", "e.g. min,mean,quantile:0.1 (Table 7)"),
                              ("--weights", "weight", f"e.g. {','.join(WEIGHTS)}")):
        p.add_argument(flag, dest="grid_" + name, help=about, type=lambda text, f=score_fields[name], flag=flag:
                       tuple(parse_knob(f, v, flag) for v in text.split(",")))
    p.add_argument("--save-maps", metavar="DIR",
                   help="write each map as a float32 TIFF at its image's original size where the official "
                        "MVTec AD / LOCO (DIR/<category>/test/<defect>/<name>.tiff) and MVTec AD 2 "
                        "(DIR/anomaly_images/..., with --alarm-rate also anomaly_images_thresholded/) evaluations read them")
    p.add_argument("--alarm-rate", type=lambda text: parse_knob(ALARM_RATE, text), metavar="A",
                   help="also report, per category, the false-alarm and detection rates of the calibrated decision "
                        "p <= A and the pixel precision and recall of its masks")


def score_flags(p):
    p.add_argument("--ckpt", required=True, help="checkpoint to score with (RUN_DIR/ckpt.pt)")
    p.add_argument("images", help="an image or a folder of images")
    p.add_argument("--out", help="output folder (default: scored/<name of the folder or image>)")
    p.add_argument("--category", help="category label for a class-conditional model")
    p.add_argument("--alarm-rate", type=lambda text: parse_knob(ALARM_RATE, text), metavar="A",
                   help="decide: scores.csv gains the conformal p_value and anomalous (p <= A), masks/ a binary "
                        "defect mask per image; at most a fraction A of normal images is flagged (README)")
    scoring(p)


def calibrate_flags(p):
    p.add_argument("--ckpt", required=True, help="checkpoint; the calibration is stored in it")
    p.add_argument("--data", help="a folder of normal images not used in training (default: the run's "
                                  "--calib-fraction hold-out, rescored with the options below)")
    p.add_argument("--category", help="the category these images belong to (several-category models)")
    scoring(p)


def export_flags(p):
    p.add_argument("--ckpt", required=True, help="checkpoint of an untiled run")
    p.add_argument("--category", help="the category it scores (several-category models)")
    p.add_argument("--alarm-rate", type=lambda text: parse_knob(ALARM_RATE, text), metavar="A",
                   help="also hold the calibration: outputs p_value, pred_label (p <= A) and pred_mask")
    p.add_argument("--data", help="a folder of images the archive is checked on against the scorer (default: the "
                                  "calibration's images, else the run's hold-out)")
    p.add_argument("--out", help="the archive, .pt2 (default: RUN/<category>.pt2)")
    p.add_argument("--aoti", action="store_true", help="also an AOTInductor package of it, OUT.aoti.pt2, checked "
                                                       "the same way (needs a C++ compiler; minutes)")
    knob_flags(p, ScoreConfig, EXPORT_RULE[1:])


def build_parser() -> Parser:
    ap = Parser(prog="flow_mismatch.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = ap.add_subparsers(dest="command", required=True, parser_class=Parser)

    def command(name, func, help, device=True, **kw):
        p = sub.add_parser(name, help=help, **kw)
        p.set_defaults(func=func)
        if device:
            p.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda if a GPU is visible (default auto)")
        return p

    p = command("train", cmd_train, "train the flow on normal images (Eq. 1)")
    train_flags(p)

    p = command("test", cmd_test, "score the test split and print the seven metrics",
                epilog="Any of --scores, --grid-K, --grid-T, --aggregators, --weights, or several --ckpt, turns "
                       "`test` into an ablation: one row per setting (mean over categories, images/s) in "
                       "OUT/sweep.md and OUT/sweep.json.")
    test_flags(p)

    p = command("score", cmd_score, "heatmaps and scores for new, unlabelled images")
    score_flags(p)

    p = command("calibrate", cmd_calibrate, "score normal images the model has not seen: the thresholds of --alarm-rate")
    calibrate_flags(p)

    p = command("export", cmd_export, "the whole scorer of one category as one torch.export archive (.pt2) that "
                                      "runs with torch alone (README, Deploying)", device=False)
    export_flags(p)

    p = command("demo", cmd_demo, "generate textures with defects, train `tiny` on CPU, test")
    p.add_argument("--out", default="demo_out", help="its data, run and evaluation (default demo_out)")
    knob_flags(p, TrainConfig, ("steps", "image_size", "seed"), shown=DEMO, helps=dict(steps="optimiser steps"))

    p = command("explain", cmd_explain, "one figure of what the scorer sees in one image (Eqs. 2-4)")
    p.add_argument("--ckpt", required=True, help="checkpoint to explain with (RUN_DIR/ckpt.pt)")
    p.add_argument("image", help="the image to explain")
    p.add_argument("--out", required=True, help="FIG.png (or .pdf, .svg); also writes FIG.json and FIG.npz")
    p.add_argument("--mask", help="its ground-truth mask, drawn as a contour")
    p.add_argument("--category", help="category label for a class-conditional model")
    knob_flags(p, ScoreConfig, [f.name for f in fields(MethodConfig)] + ["max_batch", "precision", "stride", "smooth"])
    pixel_budget(p)

    p = command("compare", cmd_compare, "our metrics.json beside the paper's Tables 1, 4 and 5", device=False)
    p.add_argument("metrics", help="EVAL_DIR/metrics.json written by `test`; writes EVAL_DIR/compare_DATASET.md")
    p.add_argument("--dataset", required=True, choices=list(PAPER), help="whose paper numbers to show")

    p = command("bench", cmd_bench, "latency and images/s of the scorer (before/eager/compiled, fp32/bf16, naive)")
    knob_flags(p, TrainConfig, ("preset", "image_size"), shown=dict(image_size="the preset's training size"))
    knob_flags(p, ScoreConfig, ("K", "T", "max_batch"))
    knob_flags(p, BenchConfig)
    p.add_argument("--json", help="also write the figures to this file")
    return ap


def terminated(signum, frame):
    """SIGTERM outside training (which saves first) stops a command as Ctrl-C does: exit 143."""
    raise KeyboardInterrupt(signum)


def main(argv=None) -> int:
    """Runs a command; returns its exit status (SKIPPED and the others above the Parser; a command's None: 0).
    What it prints never fails on a name the terminal's encoding cannot show (backslash escapes)."""
    global MAX_PIXELS
    budget = MAX_PIXELS
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
        MAX_PIXELS = getattr(args, "max_pixels", None) or budget
        return args.func(args) or 0
    except UserError as e:
        note(f"error: {e.cli_line()}")
        return e.status
    except (MemoryError, RuntimeError) as e:  # CUDA's and the CPU allocator's failures are RuntimeErrors
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and "can't allocate memory" not in str(e):
            raise
        note("error: out of memory; a smaller --batch-size, --max-batch or --image-size needs less", every_rank=True)
        return 1
    except OSError as e:  # the disk, not the input: full, gone, or refused mid-run
        note(f"error: {e.filename or 'writing output'}: {e.strerror or e}", every_rank=True)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM by `terminated`
        note("interrupted", every_rank=True)
        return 128 + (e.args[0] if e.args else signal.SIGINT)
    finally:
        MAX_PIXELS = budget
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # torch has loaded: Ctrl-C is KeyboardInterrupt again
    signal.signal(signal.SIGTERM, terminated)
    sys.exit(main())
