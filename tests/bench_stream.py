"""Peak memory of `score` (fm.score, 8 images per chunk, K = T = 1) on folders of 50 and 400
random 512x512 PNGs, each folder in its own process, so ru_maxrss is that run's peak; prints the
two peaks and their ratio (flat memory: near 1; holding every map at its original size, 1 MiB
each, would add 350 MiB at 400). Usage: python tests/bench_stream.py WORK_DIR"""

import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flow_mismatch as fm  # noqa: E402

root = Path(sys.argv[1])
if len(sys.argv) > 2:  # one measurement
    fm.score(root / "run" / "ckpt.pt", root / sys.argv[2], root / f"out_{sys.argv[2]}", fm.ScoreConfig(K=1, T=1),
             device="cpu", chunk=8, log=lambda *_: None)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    sys.exit()
rng = np.random.default_rng(0)
for n in (50, 400):
    (root / f"n{n}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(root / f"n{n}" / f"{i:03d}.png")
data = fm.make_demo_dataset(root / "data", size=16, n_train=8, n_test=2)
fm.train(data / "weave", fm.TrainConfig(preset="tiny", image_size=16, batch_size=2, steps=1), root / "run", "cpu",
         log=lambda *_: None)
peak = {n: float(subprocess.run([sys.executable, __file__, str(root), f"n{n}"], capture_output=True, text=True,
                                check=True).stdout.split()[-1]) for n in (50, 400)}
print(f"peak RSS: 50 images {peak[50]:.1f} MiB, 400 images {peak[400]:.1f} MiB, "
      f"ratio {peak[400] / peak[50]:.3f}")
