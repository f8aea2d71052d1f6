"""U-Net of App. C.1 and the CFM training step (Eq. 1)."""

import torch

import flow_mismatch as fm


def test_paper_preset_has_45_3m_parameters_with_15_classes():
    model = fm.build_model("paper", num_classes=15)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 45.3e6) <= 0.01 * 45.3e6, n


def test_paper_preset_shapes_follow_app_c1():
    model = fm.build_model("paper", 0)
    assert model.downsampling == 32  # 128 -> 4
    attn_channels = sorted({m.proj.in_channels for m in model.modules() if isinstance(m, fm.Attention)})
    assert attn_channels == [128, 256]  # attention at 32^2 (128 ch) and below (256 ch)
    heads = sorted({m.heads for m in model.modules() if isinstance(m, fm.Attention)})
    assert heads == [4, 8]  # 32 channels per head
    assert model.time_mlp[0].in_features == 64 and model.time_mlp[2].out_features == 256


def test_output_shape_and_zero_initialised_output():
    for preset in ("tiny", "small"):
        model = fm.build_model(preset, num_classes=3)
        x = torch.randn(2, 3, 32, 32)
        v = model(x, torch.rand(2), torch.tensor([0, 2]))
        assert v.shape == x.shape
        assert torch.count_nonzero(v) == 0  # zero-initialised final conv


def test_class_label_changes_the_output_once_trained():
    torch.manual_seed(0)
    model = fm.build_model("tiny", num_classes=2)
    for p in model.parameters():
        if not p.any():  # undo the zero initialisations
            torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(1, 3, 16, 16), torch.rand(1)
    assert not torch.allclose(model(x, t, torch.tensor([0])), model(x, t, torch.tensor([1])))


def test_cfm_loss_decreases_on_generated_images(mvtec):
    data = fm.load_train(mvtec, 16)
    mean, std = data.normalisation()
    y = (data.images.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.manual_seed(0)
    model = fm.build_model("tiny", 0)
    opt = fm.StableAdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)

    def eval_loss():  # fixed noise, fixed t: a deterministic objective
        with torch.no_grad():
            return fm.cfm_loss(model.eval(), y, generator=torch.Generator().manual_seed(1)).item()

    before = eval_loss()
    for _ in range(60):
        model.train()
        loss = fm.cfm_loss(model, y, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.8 * before


def test_stable_adamw_without_clipping_is_torch_amsgrad_adamw():
    """With the clip threshold at infinity the rule reduces to AdamW with AMSGrad (torch's)."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(50))
    b = torch.nn.Parameter(a.detach().clone())
    ours = fm.StableAdamW([a], lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2, clip=float("inf"))
    ref = torch.optim.AdamW([b], lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=1e-2, amsgrad=True)
    for _ in range(30):
        g = torch.randn(50) * torch.rand(1) * 3
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_stable_adamw_divides_the_step_by_update_rms():
    """Constant gradients give RMS(g^2 / v_hat) = 1 (no clipping); a 100x jump gives RMS > 1 and the
    clipped step is the unclipped one divided by that RMS (Wortsman et al. 2023, StableAdamW)."""
    def run(clip):
        p = torch.nn.Parameter(torch.zeros(100))
        opt = fm.StableAdamW([p], lr=1e-2, weight_decay=0.0, clip=clip)
        for _ in range(20):
            p.grad = torch.full((100,), 1e-3)
            opt.step()
        before = p.detach().clone()
        p.grad = torch.full((100,), 1e-1)
        opt.step()
        return (p.detach() - before).abs().mean().item(), opt.state[p], before

    clipped, state, before_c = run(1.0)
    free, _, before_f = run(float("inf"))
    assert torch.equal(before_c, before_f)  # no clipping while the gradient is steady
    v_hat = state["v_max"] / (1 - 0.99 ** 21)
    rms = (1e-2 / v_hat).mean().sqrt().item()
    assert rms > 2
    assert abs(clipped * rms - free) <= 1e-5 * free  # float32 rounding
    assert torch.all(state["v_max"] >= state["v"])
