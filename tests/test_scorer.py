"""Scorer of Eqs. (2)-(4): batched == naive loop, chunking, aggregators, image score."""

import math

import pytest
import torch

import flow_mismatch as fm


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = fm.build_model("tiny", num_classes=2).eval()
    for p in m.parameters():
        if not p.any():  # undo the zero initialisations: non-trivial velocities
            torch.nn.init.normal_(p, std=0.05)
    return m


@pytest.mark.parametrize("aggregator", ["min", "mean", "quantile:0.3"])
@pytest.mark.parametrize("weight", ["t2", "snr"])
def test_batched_scorer_equals_naive_loop(model, aggregator, weight):
    y, labels = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 1])
    cfg = fm.ScoreConfig(K=4, T=3, aggregator=aggregator, weight=weight)
    fast = fm.mismatch_heat(model, y, labels, cfg)
    slow = fm.mismatch_heat_naive(model, y, labels, cfg)
    assert fast.shape == (3, 16, 16)
    assert (fast - slow).abs().max() <= 1e-5 * max(1.0, slow.abs().max().item())


@pytest.mark.parametrize("max_batch", [1, 5, 12, 1000])
def test_chunk_size_does_not_change_the_heatmap(model, max_batch):
    y = torch.randn(2, 3, 16, 16)
    ref = fm.mismatch_heat(model, y, torch.tensor([0, 1]), fm.ScoreConfig(K=5, T=4), batch=48)
    out = fm.mismatch_heat(model, y, torch.tensor([0, 1]), fm.ScoreConfig(K=5, T=4), batch=max_batch)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_heatmap_of_an_image_does_not_depend_on_its_batch(model):
    y = torch.randn(4, 3, 16, 16)
    cfg = fm.ScoreConfig(K=3, T=2)
    labels = torch.tensor([0, 1, 1, 0])
    whole = fm.mismatch_heat(model, y, labels, cfg=cfg)
    alone = fm.mismatch_heat(model, y[2:3], labels[2:3], cfg=cfg)
    assert torch.allclose(whole[2], alone[0], rtol=1e-5, atol=1e-6)


def test_fixed_seed_is_deterministic_and_another_seed_differs(model):
    y = torch.randn(2, 3, 16, 16)
    labels = torch.tensor([0, 1])
    a = fm.mismatch_heat(model, y, labels, fm.ScoreConfig(K=2, T=2, seed=1))
    b = fm.mismatch_heat(model, y, labels, fm.ScoreConfig(K=2, T=2, seed=1))
    c = fm.mismatch_heat(model, y, labels, fm.ScoreConfig(K=2, T=2, seed=2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_min_never_exceeds_quantile_never_exceeds_max_order_statistic(model):
    y = torch.randn(2, 3, 16, 16)
    heats = {a: fm.mismatch_heat(model, y, torch.tensor([0, 1]), fm.ScoreConfig(K=6, T=3, aggregator=a))
             for a in ("min", "quantile:0.5", "quantile:1", "mean")}
    assert torch.all(heats["min"] <= heats["quantile:0.5"] + 1e-6)
    assert torch.all(heats["min"] <= heats["mean"] + 1e-6)
    assert torch.all(heats["quantile:0.5"] <= heats["quantile:1"] + 1e-6)
    assert torch.all(heats["mean"] <= heats["quantile:1"] + 1e-6)  # mean <= max over paths
    assert (heats["mean"] - heats["min"]).mean() > 0


def test_forwards_are_chunked_to_max_batch(model):
    """K * T forwards in chunks of at most max_batch inputs, each (k, t) exactly once."""
    y = torch.randn(1, 3, 16, 16)
    seen = []

    def spy(module, inputs, output):
        seen.append(inputs[0].shape[0])

    h = model.register_forward_hook(spy)
    fm.mismatch_heat(model, y, torch.tensor([1]), fm.ScoreConfig(K=50, T=2), batch=8)
    h.remove()
    assert max(seen) <= 8 and sum(seen) == 50 * 2


def test_time_grid_and_weight_follow_eq_4():
    """A model that predicts v = 0 gives Z = ||y - x0||^2; with K = 1 and w = 1 the heatmap is the
    mean over the T times of the same Z, with w = t2 it is scaled by mean_j (j/(T+1))^2."""
    zero = lambda xt, t, labels=None: torch.zeros_like(xt)  # noqa: E731
    y = torch.randn(1, 3, 8, 8)
    flat = fm.mismatch_heat(zero, y, cfg=fm.ScoreConfig(K=1, T=4, weight="1"), batch=8)
    t2 = fm.mismatch_heat(zero, y, cfg=fm.ScoreConfig(K=1, T=4, weight="t2"), batch=8)
    x0 = fm.path_noise(0, [0], 0, (3, 8, 8), "cpu")
    assert torch.allclose(flat, (y - x0).square().sum(1), rtol=1e-6)
    scale = sum((j / 5) ** 2 for j in range(1, 5)) / 4
    assert torch.allclose(t2, scale * flat, rtol=1e-6)


def test_image_score_is_max_plus_mean_of_top_one_percent():
    heat = torch.zeros(1, 20, 20)  # 400 pixels: the top 1 % is 4 pixels
    heat[0, 0, :6] = torch.tensor([10.0, 6.0, 4.0, 2.0, 1.0, 1.0])
    assert fm.image_score(heat).item() == pytest.approx(10 + (10 + 6 + 4 + 2) / 4)
    heat = torch.rand(2, 7, 7)  # 49 pixels: ceil(0.49) = 1 pixel
    assert torch.allclose(fm.image_score(heat), 2 * heat.flatten(1).max(1).values)


@pytest.mark.parametrize("bad", ["max", "quantile:", "quantile:1.5", "quantile:0", "quantile:x"])
def test_unknown_aggregator_is_a_user_error(bad):
    with pytest.raises(fm.UserError, match="^--aggregator: .* is not min, mean or quantile"):
        fm.MethodConfig(aggregator=bad)
    with pytest.raises(ValueError, match="is not min, mean or quantile"):  # the method's own function: why alone
        fm.aggregator_rank(bad, 10)


def test_quantile_is_the_ceil_alpha_K_order_statistic():
    assert fm.aggregator_rank("quantile:0.2", 10) == 2
    assert fm.aggregator_rank("quantile:0.25", 10) == math.ceil(2.5)
    assert fm.aggregator_rank("quantile:0.01", 10) == 1
    assert fm.aggregator_rank("min", 10) == 1 and fm.aggregator_rank("mean", 10) is None


@pytest.mark.parametrize("preset,size", [("tiny", 64), ("tiny", 16), ("small", 64), ("paper", 128), ("paper", 2048)])
def test_automatic_cpu_batch_keeps_one_activation_within_budget(preset, size):
    """--max-batch 0 on CPU: the largest batch whose full-resolution activation
    (batch x base_channels x H x W) fits 2^21 numbers, and never less than one input."""
    model = fm.build_model(preset)
    n = fm.forward_batch(fm.ScoreConfig(), model, torch.zeros(1, 3, size, size))
    per_input = model.cfg.base_channels * size * size
    assert n >= 1
    assert n * per_input <= 2**21 or n == 1
    assert (n + 1) * per_input > 2**21
    assert fm.forward_batch(fm.ScoreConfig(max_batch=5), model, torch.zeros(1, 3, size, size)) == 5


def test_bf16_autocast_moves_the_heatmap_by_under_two_percent(model):
    """--precision bf16 runs the U-Net in bfloat16 (8-bit mantissa, unit roundoff 2^-8 = 0.4 %);
    the heatmap, accumulated in fp32, stays within 2 % of fp32 (relative to its maximum), and it
    does differ, so the bf16 path is really taken."""
    y = torch.randn(3, 3, 16, 16)
    labels = torch.tensor([0, 1, 1])
    h32 = fm.run_mismatch_heat(model, y, labels, fm.ScoreConfig(K=3, T=3, precision="fp32"))
    h16 = fm.run_mismatch_heat(model, y, labels, fm.ScoreConfig(K=3, T=3, precision="bf16"))
    rel = ((h16 - h32).abs().max() / h32.abs().max()).item()
    assert 0 < rel < 0.02
