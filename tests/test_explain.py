"""`explain`: its per-time maps are the scorer's, checked against a hand loop over paths, and
recombine to mismatch_heat's H bit for bit; the CLI writes the figure and its numbers."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import flow_mismatch as fm


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = fm.build_model("tiny").eval()
    torch.nn.init.normal_(m.out[-1].weight, std=0.05)  # a non-zero velocity field
    return m


def test_maps_are_the_scorers_and_recombine_to_heat(model):
    cfg = fm.ScoreConfig(K=3, T=4, seed=5)
    y = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    e = fm.explain_maps(model, y, None, cfg)
    heat = fm.mismatch_heat(model, y, None, cfg)[0]
    assert torch.equal(e["maps"].mean(0), heat) and torch.equal(e["heat"], heat)
    assert e["score"] == float(fm.image_score(heat[None])[0])
    with torch.no_grad():  # Eqs. (2)-(3) by hand: Z_t^(k) per path, then min and mean over k
        for j in range(cfg.T):
            t = torch.tensor([(j + 1) / (cfg.T + 1)])
            z = []
            for k in range(cfg.K):
                x0 = fm.path_noise(cfg.seed, [0], k, (3, 16, 16), "cpu")
                z.append((model((1 - t) * x0 + t * y, t) - (y - x0)).square().sum(1)[0])
            z = torch.stack(z)
            torch.testing.assert_close(e["maps"][j], t**2 * z.min(0).values, rtol=1e-5, atol=1e-6)
            if j == e["t_star"]:
                torch.testing.assert_close(e["spread"]["min"], z.min(0).values, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(e["spread"]["mean"], z.mean(0), rtol=1e-5, atol=1e-6)
    peak = e["peak"]
    assert heat[peak] == heat.max() and e["t_star"] == int(e["maps"][:, peak[0], peak[1]].argmax())


def test_cli_writes_figure_json_and_arrays(trained, mvtec, tmp_path, capsys):
    image = mvtec / "weave" / "test" / "stain" / "000.png"
    mask = mvtec / "weave" / "ground_truth" / "stain" / "000_mask.png"
    out = tmp_path / "figs" / "stain.png"
    assert fm.main(["explain", "--ckpt", str(trained), str(image), "--mask", str(mask), "--category", "weave",
                    "-K", "2", "-T", "3", "--device", "cpu", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.width > 500 and im.height > 300
    numbers = json.loads(out.with_suffix(".json").read_text())
    arrays = np.load(out.with_suffix(".npz"))
    assert numbers["T"] == 3 and len(numbers["times"]) == 3 and numbers["mask"] == str(mask)
    assert sum(r["share_of_H"] for r in numbers["times"]) == pytest.approx(1, rel=1e-5)
    assert arrays["maps"].shape == (3, 16, 16)
    np.testing.assert_allclose(arrays["heat"].max(), numbers["heat"]["max"], rtol=1e-6)
    # the same mask as label ids (0/1, as many datasets store them) is the same mask, as `test` reads it
    ids = tmp_path / "ids_mask.png"
    Image.fromarray((np.asarray(Image.open(mask).convert("L")) > 0).astype(np.uint8)).save(ids)
    assert fm.main(["explain", "--ckpt", str(trained), str(image), "--mask", str(ids), "--category", "weave",
                    "-K", "2", "-T", "3", "--device", "cpu", "--out", str(tmp_path / "ids.png")]) == 0
    assert json.loads((tmp_path / "ids.json").read_text())["heat_in_mask"] == numbers["heat_in_mask"]
    assert numbers["heat_in_mask"]["inside"] is not None
    # the same image through `score` (the production path: loading, normalisation, path noise) gives the same S
    capsys.readouterr()
    assert fm.main(["score", "--ckpt", str(trained), str(image), "--category", "weave", "-K", "2", "-T", "3",
                    "--device", "cpu", "--out", str(tmp_path / "score")]) == 0
    s = float(capsys.readouterr().out.split()[0])
    assert numbers["score"] == pytest.approx(s, rel=1e-5)


@pytest.mark.parametrize("args, flag", [(["--out", "{tmp}/fig.txt"], "--out"),
                                        (["--mask", "{tmp}/none.png", "--out", "{tmp}/fig.png"], "--mask")])
def test_cli_errors_name_the_flag(trained, mvtec, tmp_path, capsys, args, flag):
    image = mvtec / "weave" / "test" / "good" / "000.png"
    argv = ["explain", "--ckpt", str(trained), str(image), "--category", "weave", "--device", "cpu"]
    assert fm.main(argv + [a.format(tmp=tmp_path) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flow_mismatch.py: error: {flag}") and "\n" not in err
    assert not any(tmp_path.iterdir())


def test_explain_and_score_agree_under_non_default_rules(trained, mvtec, tmp_path):
    """explain computes score's H and S from the same ScoreConfig: under --image-score max --aggregator
    mean --weight snr its S is score's printed S and its H is score's map (maps/*.tiff)."""
    image = mvtec / "weave" / "test" / "stain" / "000.png"
    rules = ["--image-score", "max", "--aggregator", "mean", "--weight", "snr", "-K", "2", "-T", "3", "--seed", "4"]
    out = tmp_path / "fig.png"
    assert fm.main(["explain", "--ckpt", str(trained), str(image), "--category", "weave", "--device", "cpu",
                    "--out", str(out), *rules]) == 0
    numbers, heat = json.loads(out.with_suffix(".json").read_text()), np.load(out.with_suffix(".npz"))["heat"]
    assert fm.main(["score", "--ckpt", str(trained), str(image), "--category", "weave", "--device", "cpu",
                    "--out", str(tmp_path / "score"), *rules]) == 0
    s = float((tmp_path / "score" / "scores.csv").read_text().splitlines()[1].split(",")[1])
    assert numbers["score"] == pytest.approx(s, rel=1e-6) and numbers["score"] == pytest.approx(heat.max(), rel=1e-6)
    with Image.open(next((tmp_path / "score" / "maps").rglob("*.tif*"))) as im:
        np.testing.assert_allclose(np.asarray(im), heat, rtol=1e-5, atol=1e-7)
