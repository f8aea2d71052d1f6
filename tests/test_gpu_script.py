"""tests/gpu.sh, the script run first whenever a GPU is available: its --dry-run (the same steps on
the CPU, preset tiny) runs every step and writes every step's figures to gpu.json and gpu.md."""

import json
import math
import os
import subprocess
import sys

from conftest import ROOT, run_cli

SCRIPT = ROOT / "tests" / "gpu.sh"
STEPS = ["machine", "tests", "score_k10_nchw", "score_k2_nchw", "train", "score_k10_nchw_compiled",
         "score_k10_nchw_graphs", "score_k2_nchw_compiled", "train_compiled", "score_k10_channels_last",
         "score_k2_channels_last", "export"]
VARIANTS = {"": ["eager_bf16w"], "_compiled": ["compiled", "compiled_bf16"], "_graphs": ["graphs"]}  # and:
EVERY = ["before", "eager", "eager_bf16"]


def gpu_sh(*args, timeout=600):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable})


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_dry_run_writes_every_steps_figures(tmp_path):
    r = gpu_sh("--dry-run", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    run = json.loads((tmp_path / "gpu.json").read_text())
    md = (tmp_path / "gpu.md").read_text()
    assert run["dry_run"] is True
    steps = {s["name"]: s for s in run["steps"]}
    assert [s["name"] for s in run["steps"]] == STEPS
    has_export = run_cli("export", "--help").returncode == 0
    for name, s in steps.items():
        want = "ok" if name != "export" or has_export else "skipped: flow_mismatch.py has no export command"
        assert s["status"] == want, (name, s["status"])
        assert f"| {name} | {want} |" in md
        assert bool(s["figures"]) == (want == "ok"), name  # each step's own figures, none for a skipped one
    f = steps["tests"]["figures"]
    assert f["passed"] >= 2 and f["failures"] == f["errors"] == 0
    for kt, layout, kind in ((10, "nchw", ""), (2, "nchw", ""), (10, "nchw", "_compiled"), (10, "nchw", "_graphs"),
                             (2, "nchw", "_compiled"), (10, "channels_last", ""), (2, "channels_last", "")):
        name = f"score_k{kt}_{layout}{kind}"
        f = steps[name]["figures"]
        assert (f["mode"], f["preset"], f["K"], f["T"], f["layout"]) == ("score", "tiny", kt, kt, layout)
        variants = EVERY + VARIANTS[kind] + (["graphs"] if name == "score_k2_nchw_compiled" else [])
        assert sorted(k[:-4] for k in f if k.endswith("_fps") and k != "batched_fps") == sorted(variants), name
        for v in variants:
            assert all(positive(f[f"{v}_{what}"]) for what in ("fps", "forward_ms", "latency_ms")), (name, v)
            assert f"| {v} | {f[v + '_forward_ms']:.4g} | {f[v + '_fps']:.4g} |" in md.split(f"## {name}\n")[1]
        assert positive(f["peak_mem_bytes"]) and f.get("bf16w_heat_max_rel_diff", 0) < 0.02
    for name in ("train", "train_compiled"):
        f = steps[name]["figures"]
        assert f["mode"] == "train" and positive(f["eager_train_fps"]) and positive(f["peak_mem_bytes"])
        assert positive(f["compiled_train_fps"]) if name == "train_compiled" else "compiled_train_fps" not in f
        assert f"| eager_train_fps | {f['eager_train_fps']:.4g} |" in md.split(f"## {name}\n")[1]


def test_a_spent_budget_skips_the_steps_and_still_writes_both_files(tmp_path):
    r = gpu_sh("--dry-run", "--out", tmp_path, "--budget", 0)
    assert r.returncode == 0, r.stderr
    run = json.loads((tmp_path / "gpu.json").read_text())
    assert [s["name"] for s in run["steps"]] == STEPS
    assert all(s["status"] == "skipped: budget spent" for s in run["steps"] if s["name"] not in ("machine", "export"))
    assert "| score_k10_nchw | skipped: budget spent | 0.0 |" in (tmp_path / "gpu.md").read_text()


def test_an_unknown_argument_is_one_line_and_exit_2(tmp_path):
    r = gpu_sh("--out", tmp_path, "--bugdet", 10)
    assert r.returncode == 2 and r.stderr.strip() == "tests/gpu.sh: --bugdet: unknown argument (--dry-run, --out DIR, " \
                                                     "--budget SECONDS)"
    assert not list(tmp_path.iterdir())
