"""How to run the U-Net in bf16 at inference: autocast (fp32 weights, casts around every op, GroupNorm
in fp32) against the weights themselves in bf16 (no casts, GroupNorm in bf16), eager and under
torch.compile.

    python tests/bench_precision.py --preset tiny --batch 32 --size 64      # ~5 min on two CPU cores
    python tests/bench_precision.py --preset paper --batch 512 --device cuda

Prints one forward's milliseconds per variant (the fastest of --repeats, variants interleaved repeat by
repeat, so a passing load hits them alike), each variant's speed-up over eager fp32 measured in this
same run, and its largest output difference relative to the output's range (the scorer's heatmaps
tolerate 2 %). Weights are drawn at random (std 0.02 where the U-Net initialises zeros), so the
output is not trivially zero."""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import fm  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=list(fm.PRESETS))
    ap.add_argument("--batch", type=int, default=32, help="U-Net inputs per forward")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true", help="eager variants only")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = fm.build_model(args.preset)
    for p in model.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.02)
    model = fm.inference_model(model, device)
    layout = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=layout)
    t = torch.rand(args.batch, device=device)
    w16 = copy.deepcopy(model).to(torch.bfloat16)
    x16 = x.to(torch.bfloat16)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def autocast(m):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return m(x, t)
        return run

    variants = {"eager_fp32": lambda: model(x, t), "eager_autocast_bf16": autocast(model),
                "eager_weights_bf16": lambda: w16(x16, t)}
    compile_s = {}
    if not args.no_compile:
        for name, m, run in (("fp32", model, lambda c: lambda: c(x, t)), ("autocast_bf16", model, autocast),
                             ("weights_bf16", w16, lambda c: lambda: c(x16, t))):
            fn = run(torch.compile(copy.deepcopy(m), fullgraph=True, dynamic=False))
            with torch.no_grad():
                t0 = time.perf_counter()
                fn()
                sync()
            compile_s[f"compiled_{name}"] = time.perf_counter() - t0
            variants[f"compiled_{name}"] = fn
    times, outs = {}, {}
    with torch.no_grad():
        for v, fn in variants.items():  # warm-up
            outs[v] = fn().float()
        for _ in range(args.repeats):
            for v, fn in variants.items():
                sync()
                t0 = time.perf_counter()
                fn()
                sync()
                times.setdefault(v, []).append(time.perf_counter() - t0)
    ref = outs["eager_fp32"]
    span = float(ref.max() - ref.min())
    base = min(times["eager_fp32"])
    rows = {v: dict(ms=1e3 * min(ts), vs_eager_fp32=base / min(ts),
                    max_diff_rel=float((outs[v] - ref).abs().max()) / span, compile_s=compile_s.get(v))
            for v, ts in times.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{args.preset} U-Net, batch {args.batch} at {args.size}^2 on {name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for v, r in rows.items():
        c = f"  compile {r['compile_s']:.1f} s" if r["compile_s"] is not None else ""
        print(f"{v:>32}: {r['ms']:9.2f} ms  {r['vs_eager_fp32']:5.2f}x  max diff {100 * r['max_diff_rel']:.3f} %{c}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(vars(args), device_name=name, rows=rows), indent=2))


if __name__ == "__main__":
    main()
