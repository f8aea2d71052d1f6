"""The speed paths compute what the plain ones do: contiguous attention, the compiled U-Net at
one fixed batch, compiled training, the foreach StableAdamW; and the variants `bench` measures for a GPU:
bf16 weights and CUDA graph replays."""

import functools
import os

import pytest
import torch
import torch.nn.functional as F

import flow_mismatch as fm

# Smallest U-Net with every block kind: one downsampling, attention at 8^2 (16^2 inputs), two classes.
MINI = fm.ModelConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,), head_channels=8,
                      norm_groups=4, num_classes=2)


def random_unet(cfg=MINI, seed=0):
    torch.manual_seed(seed)
    model = fm.UNet(cfg)
    for p in model.parameters():
        if not p.any():  # undo the zero initialisations: outputs worth comparing
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_attention_gives_sdpa_stride_one_and_equals_the_strided_formulation(monkeypatch):
    seen = []

    def recording(q, k, v, *args, **kwargs):
        seen.append([u.stride(-1) for u in (q, k, v)])
        return sdpa(q, k, v, *args, **kwargs)

    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    model = random_unet().eval()  # no dropout
    x, t, labels = torch.randn(3, 3, 16, 16), torch.rand(3), torch.tensor([0, 1, 1])
    for fmt in (torch.contiguous_format, torch.channels_last):
        model, xf = model.to(memory_format=fmt), x.contiguous(memory_format=fmt)
        seen.clear()
        v = model(xf, t, labels)
        assert len(seen) == sum(isinstance(m, fm.Attention) for m in model.modules()) == 4
        assert all(s == [1, 1, 1] for s in seen)  # q, k, v: stride 1 along channels
        ref = fm.with_strided_attention(model)(xf, t, labels)
        assert torch.allclose(v, ref, atol=1e-5, rtol=0), (v - ref).abs().max()
        attn = model.mid[1]
        h = torch.randn(2, attn.norm.num_channels, 4, 4).contiguous(memory_format=fmt)
        assert torch.allclose(attn(h), fm.strided_attention(attn, h), atol=1e-5, rtol=0)


def test_unet_with_bf16_weights_runs_and_stays_within_2_percent():
    """The U-Net cast to bf16 whole (tests/bench_precision.py times it against autocast): its output
    differs from fp32 by under 2 % of the output's range, the heatmap tolerance."""
    model = random_unet().eval()
    x, t, labels = torch.randn(3, 3, 16, 16), torch.rand(3), torch.tensor([0, 1, 1])
    ref = model(x, t, labels)
    v = model.to(torch.bfloat16)(x.bfloat16(), t, labels)
    assert v.dtype == torch.bfloat16
    assert (v.float() - ref).abs().max() < 0.02 * (ref.max() - ref.min())


@pytest.fixture
def aot_eager(monkeypatch):
    """torch.compile with the aot_eager backend: the same graph capture, padding and guards as
    inductor without its C++ build (80+ s for this model on 2 cores); a recompile is an error
    (set through dynamo's own config.patch: pytest's monkeypatch cannot see its attributes on every pytest)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def check_compiled_scorer(capsys):
    model = random_unet()
    eager = fm.inference_model(model, "cpu")
    compiled = fm.inference_model(model, "cpu", compile=True)
    x, t, labels = torch.randn(7, 3, 16, 16), torch.rand(7), torch.tensor([0, 1, 0, 1, 1, 0, 1])
    with torch.no_grad():
        for n in (4, 7, 3, 1):  # the first call fixes 4 rows; then 4 + 3 rows, 3, 1: padded, not recompiled
            v = compiled(x[:n], t[:n], labels[:n])
            assert v.shape == (n, 3, 16, 16)
            assert torch.allclose(v, eager(x[:n], t[:n], labels[:n]), atol=1e-5, rtol=0)
        y = torch.randn(2, 3, 16, 16)
        cfg = fm.ScoreConfig(K=3, T=2, max_batch=4)
        assert torch.allclose(fm.run_mismatch_heat(compiled, y, labels[:2], cfg),
                              fm.run_mismatch_heat(eager, y, labels[:2], cfg), atol=1e-5, rtol=0)
    err = capsys.readouterr().err
    assert err.count("compiled in") == err.count("flow_mismatch.py: torch.compile:") == 1  # the compile time, once


def test_scorer_forwards_are_full_but_the_last():
    """4 images x T = 10 times x K = 10 paths at max_batch 32: 400 inputs run as 12 forwards of 32 and
    one of 16, whatever the paths' boundaries, so the compiled U-Net pads one forward, not one per path;
    and the heatmap equals the one-path-at-a-time definition."""
    model, sizes = random_unet().eval(), []

    def counting(x, t, labels=None):
        sizes.append(len(x))
        return model(x, t, labels)

    y, labels, cfg = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 1, 0]), fm.ScoreConfig(K=10, T=10, max_batch=32)
    heat = fm.run_mismatch_heat(counting, y, labels, cfg)
    assert sizes == [32] * 12 + [16]
    assert torch.allclose(heat, fm.mismatch_heat_naive(model, y, labels, cfg), atol=1e-5, rtol=1e-5)


def test_compiled_scorer_equals_eager_and_compiles_once(aot_eager, capsys):
    check_compiled_scorer(capsys)


@pytest.mark.skipif(not os.environ.get("FM_INDUCTOR_TESTS"),
                    reason="inductor's first compile of even this U-Net takes 80+ s on 2 cores; FM_INDUCTOR_TESTS=1 runs it")
def test_compiled_scorer_with_inductor_equals_eager(capsys):
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        check_compiled_scorer(capsys)


def test_compiled_training_equals_eager(mvtec, tmp_path, aot_eager):
    data = fm.load_train(mvtec, 16)
    cfg = fm.TrainConfig(preset="tiny", image_size=16, batch_size=4, steps=3)
    logs = []
    weights = [fm.load_checkpoint(fm.train(data, cfg, tmp_path / str(c), "cpu", log=logs.append, compile=c))["model"]
               for c in (False, True)]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the U-Net did run compiled
    assert sum("training step compiled in" in line for line in logs) == 1  # its compile time, once
    for k, w in weights[0].items():
        assert torch.allclose(w, weights[1][k], atol=1e-5, rtol=0), k


class ReferenceStableAdamW(torch.optim.Optimizer):
    """StableAdamW one tensor at a time, as first written: the reference of the foreach one."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-4, clip=1.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clip=clip))
        self.clipped = 0  # tensor-steps whose update RMS exceeded the clip

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(g)
                    state["v"] = torch.zeros_like(g)
                    state["v_max"] = torch.zeros_like(g)
                state["step"] += 1
                m, v, v_max = state["m"], state["v"], state["v_max"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                torch.maximum(v_max, v, out=v_max)  # AMSGrad
                v_hat = v_max / (1 - b2 ** state["step"])
                rms = (g.square() / v_hat.clamp_min(group["eps"] ** 2)).mean().sqrt()
                self.clipped += int(rms > group["clip"])
                lr = group["lr"] / torch.clamp(rms / group["clip"], min=1.0)  # update-RMS clipping
                p.mul_(1 - lr * group["weight_decay"])
                update = (m / (1 - b1 ** state["step"])) / (v_hat.sqrt() + group["eps"])
                p.add_(-lr * update)


def test_foreach_stable_adamw_equals_the_per_tensor_one_over_20_steps():
    """20 steps of the tiny-preset-like U-Net with gradient spikes every 5th step (so both
    AMSGrad's maximum and the update-RMS clip act) and a second group with a gradless tensor."""
    models = [random_unet(seed=1).eval() for _ in range(2)]  # eval: no dropout, the same gradients
    spare = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]  # never gets a gradient
    kw = dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2, clip=1.0)
    ours = fm.StableAdamW([{"params": models[0].parameters()}, {"params": [spare[0]], "lr": 5e-3}], **kw)
    ref = ReferenceStableAdamW([{"params": models[1].parameters()}, {"params": [spare[1]], "lr": 5e-3}], **kw)
    gen = torch.Generator().manual_seed(0)
    y, labels = torch.randn(4, 3, 16, 16, generator=gen), torch.tensor([0, 1, 0, 1])
    for step in range(20):
        scale = 30.0 if step % 5 == 4 else 1.0
        for model, opt in ((models[0], ours), (models[1], ref)):
            loss = scale * fm.cfm_loss(model, y, labels, torch.Generator().manual_seed(step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    assert ref.clipped > 0  # the clip acted
    assert any((s["v_max"] > s["v"]).any() for s in ref.state.values())  # AMSGrad's maximum acted
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (a - b).abs().max()
    assert torch.equal(spare[0], spare[1]) and not ours.state[spare[0]]
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert ours.state[a]["step"] == ref.state[b]["step"] == 20
        assert torch.allclose(ours.state[a]["v_max"], ref.state[b]["v_max"], atol=1e-12, rtol=1e-6)


def test_scorer_with_bf16_weights_stays_within_2_percent_of_fp32():
    """`bench --bf16-weights` (BF16Weights): the scorer on a U-Net whose weights are bf16 copies, run
    outside autocast, gives heatmaps within 2 % of the fp32 heatmap's maximum (the stated tolerance) and
    leaves the fp32 model as it was. Runs on the CPU; on CUDA the same module runs."""
    model = random_unet().eval()
    y, labels, cfg = torch.randn(2, 3, 16, 16), torch.tensor([0, 1]), fm.ScoreConfig(K=3, T=2, precision="fp32")
    ref = fm.mismatch_heat(model, y, labels, cfg)
    w16 = fm.BF16Weights(model)
    assert all(p.dtype == torch.bfloat16 for p in w16.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for precision in ("fp32", "bf16"):  # whatever autocast the scorer asks for
        heat = fm.mismatch_heat(w16, y, labels, fm.replace(cfg, precision=precision))
        assert heat.dtype == torch.float32
        assert (heat - ref).abs().max() < 0.02 * ref.abs().max(), (heat - ref).abs().max() / ref.abs().max()


class GraphReplay:
    """What a CUDA graph does to outputs, on the CPU: every call writes its output into one static
    buffer and returns that buffer, so a caller that keeps an output past the next call sees it change."""

    def __init__(self, model):
        self.model, self.buffer = model, None

    def __call__(self, *args):
        out = self.model(*args)
        self.buffer = out.clone() if self.buffer is None else self.buffer.copy_(out)
        return self.buffer


def test_graphed_scorer_equals_eager_though_each_replay_overwrites_its_output(monkeypatch):
    """`bench --graphs` (graphed): Compiled at a fixed batch with torch.compile(mode="reduce-overhead").
    CUDA graphs cannot run on a CPU, so torch.compile is replaced by GraphReplay, a CPU stand-in with a
    CUDA graph's output semantics; a call of 7 rows at batch 4 replays twice, and the heatmap over several
    forwards equals eager's."""
    modes = []

    def fake_compile(model, mode=None, **kw):
        modes.append(mode)
        return GraphReplay(model) if mode == "reduce-overhead" else model

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = random_unet().eval()
    g = fm.graphed(model)
    assert "reduce-overhead" in modes
    x, t, labels = torch.randn(7, 3, 16, 16), torch.rand(7), torch.tensor([0, 1, 0, 1, 1, 0, 1])
    with torch.no_grad():
        for n in (4, 7, 3):
            v, ref = g(x[:n], t[:n], labels[:n]), model(x[:n], t[:n], labels[:n])
            assert torch.allclose(v, ref, atol=1e-5, rtol=0), (v - ref).abs().max()
    y, cfg = torch.randn(2, 3, 16, 16), fm.ScoreConfig(K=3, T=2, max_batch=4)
    assert torch.allclose(fm.mismatch_heat(g, y, labels[:2], cfg), fm.mismatch_heat(model, y, labels[:2], cfg),
                          atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA; tests/gpu.sh runs it on a GPU")
def test_on_cuda_compiled_graphed_and_bf16_weights_scorers_agree_with_eager():
    """On a GPU, with inductor and real CUDA graph replays: the scorer through Compiled and graphed
    equals eager in fp32 to 1e-3 of the heatmap's maximum (TF32 convolutions round alike in both, but
    inductor may order sums differently), also where one call replays twice (7 rows at batch 4); with
    BF16Weights it stays within the 2 % tolerance."""
    model = random_unet().cuda().eval()
    y, labels = torch.randn(2, 3, 16, 16, device="cuda"), torch.tensor([0, 1], device="cuda")
    cfg = fm.ScoreConfig(K=3, T=2, max_batch=4, precision="fp32")
    x, t = torch.randn(7, 3, 16, 16, device="cuda"), torch.rand(7, device="cuda")
    x_labels = torch.tensor([0, 1, 0, 1, 1, 0, 1], device="cuda")
    with torch.no_grad():
        ref, v_ref = fm.mismatch_heat(model, y, labels, cfg), model(x, t, x_labels)
        torch._dynamo.reset()
        for wrapped in (fm.Compiled(model), fm.graphed(model)):
            heat = fm.mismatch_heat(wrapped, y, labels, cfg)  # the first call fixes the batch: 4
            assert (heat - ref).abs().max() <= 1e-3 * ref.abs().max(), type(wrapped.compiled)
            v = wrapped(x, t, x_labels)
            assert (v - v_ref).abs().max() <= 1e-3 * v_ref.abs().max(), type(wrapped.compiled)
        heat = fm.mismatch_heat(fm.BF16Weights(model), y, labels, cfg)
        assert (heat - ref).abs().max() < 0.02 * ref.abs().max()
