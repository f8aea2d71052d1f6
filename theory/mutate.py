"""Mutation testing of the theory checks: every claim's tests must catch small formula errors.

    python theory/mutate.py            # all 36 mutations, 2 at a time
    python theory/mutate.py -k 4.3     # only the claims whose name contains "4.3"

Each mutation is one small textual change to a formula in theory/ (a power of t, a sign, a
constant, min for mean). It is applied to a temporary copy of theory/, the tests of that claim
run there, and the mutation is "caught" if they fail (pytest exit status 1). The unmutated
copy is run first: a mutation only counts against tests that pass. Exit status 0 when every
mutation is caught. Not part of CI (pytest does not collect this file).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (claim, tests to run (paths relative to theory/, "::test" allowed), file, old, new)
MUTATIONS = [
    ("Lemma 4.2 (Tweedie)", "test_theory_lemma_4_2_tweedie.py::test_lemma_4_2_tweedie", "test_theory_lemma_4_2_tweedie.py",
     "x / t + (1 - t) ** 2 / t * r.score(t, x)", "x / t + (1 - t) / t * r.score(t, x)"),
    ("Lemma 4.2 (Tweedie)", "test_theory_lemma_4_2_tweedie.py::test_lemma_4_2_tweedie", "gmm.py",
     'return -np.einsum("nk,knd->nd", gamma, prec_diff)', 'return np.einsum("nk,knd->nd", gamma, prec_diff)'),
    ("Lemma 4.2 (Tweedie)", "test_theory_lemma_4_2_tweedie.py::test_lemma_4_2_tweedie", "gmm.py",
     "(1 - t) ** 2 * np.eye(self.d)  # Assumption", "(1 - t) * np.eye(self.d)  # Assumption"),
    ("Prop 4.1", "test_theory_prop_4_1.py", "test_theory_prop_4_1.py",
     "(1 - t) * ((y - x0) - p.velocity(t, x))", "(1 - t) ** 2 * ((y - x0) - p.velocity(t, x))"),
    ("Prop 4.1", "test_theory_prop_4_1.py", "gmm.py",
     'return (1 - t) * np.einsum("nk,knd->nd", gamma, prec_diff)', 'return np.einsum("nk,knd->nd", gamma, prec_diff)'),
    ("Prop 4.1", "test_theory_prop_4_1.py", "gmm.py",
     "cond = self.means[:, None, :] + t * np.einsum", "cond = self.means[:, None, :] + t**2 * np.einsum"),
    ("Prop A.3", "test_theory_prop_a_3.py", "test_theory_prop_a_3.py",
     "c = (1 - t) ** 4 / t**2", "c = (1 - t) ** 2 / t**2"),
    ("Prop A.3", "test_theory_prop_a_3.py", "test_theory_prop_a_3.py",
     "c = (1 - t) ** 4 / t**2", "c = (1 - t) ** 4 / t"),
    ("Thm 4.3", "test_theory_thm_4_3.py", "test_theory_thm_4_3.py",
     "c = (1 - t) ** 2 * (q.score(t, x) - p.score(t, x)) ** 2", "c = (1 - t) ** 4 * (q.score(t, x) - p.score(t, x)) ** 2"),
    ("Thm 4.3", "test_theory_thm_4_3.py", "test_theory_thm_4_3.py",
     "a = t**2 * (p.velocity(t, x) - (y - x0)) ** 2", "a = t * (p.velocity(t, x) - (y - x0)) ** 2"),
    ("Thm 4.3", "test_theory_thm_4_3.py", "test_theory_thm_4_3.py",
     "w, se = mean_se(t**2 / (1 - t) ** 2 *", "w, se = mean_se(t**2 / (1 - t) ** 3 *"),
    ("Thm 4.3", "test_theory_thm_4_3.py", "gmm.py",
     "return float((t**2 * lam / (t**2 * lam + (1 - t) ** 2)).sum())", "return float((t * lam / (t * lam + (1 - t) ** 2)).sum())"),
    ("§4.3 endpoint", "test_theory_sec_4_3.py", "gmm.py",
     "shift = t * Pp @ (np.asarray(mq)", "shift = Pp @ (np.asarray(mq)"),
    ("§4.3 endpoint", "test_theory_sec_4_3.py", "gmm.py",
     "np.trace(M @ Cq @ M)", "np.trace(M @ M)"),
    ("§4.3 endpoint", "test_theory_sec_4_3.py", "gmm.py",
     "return float((t**2 * lam / (t**2 * lam + (1 - t) ** 2)).sum())", "return float((t**2 * lam / (t**2 * lam + (1 - t) ** 3)).sum())"),
    ("Prop A.2", "test_theory_prop_a_2.py", "test_theory_prop_a_2.py",
     "rhs_lo = np.maximum(k * quantile(G, a - e, axis=1) - quantile(E, 1 - b + e, axis=1), 0)",
     "rhs_lo = np.maximum(k * quantile(G, a - e, axis=1) - quantile(E, b + e, axis=1), 0)"),
    ("Prop A.2", "test_theory_prop_a_2.py", "test_theory_prop_a_2.py",
     "    k = (1 - t) / t\n    U = E / k", "    k = t / (1 - t)\n    U = E / k"),
    ("Prop A.2", "test_theory_prop_a_2.py", "test_theory_prop_a_2.py",
     "lhs_hi = quantile(L, a + b + e, axis=1)", "lhs_hi = quantile(L, a + e, axis=1)"),
    ("A.4 display", "test_theory_prop_a_2.py::test_prop_a_2_display_before_eq_9_typo", "test_theory_prop_a_2.py",
     "assert np.all(quantile(E**2, a + b, axis=1) == 0)", "assert np.all(quantile(L**2, a + b, axis=1) == 0)"),
    ("A.4 display", "test_theory_prop_a_2.py::test_prop_a_2_display_before_eq_9_typo", "test_theory_prop_a_2.py",
     "rhs = k**2 * np.maximum(quantile(G, a, axis=1)", "rhs = k**2 * np.maximum(quantile(G, a + 2 * b, axis=1)"),
    ("Lemma A.4", "test_theory_lemma_a_4.py", "test_theory_lemma_a_4.py",
     "C = 1 / 6  #", "C = 1  #"),
    ("Lemma A.4", "test_theory_lemma_a_4.py", "test_theory_lemma_a_4.py",
     "return 2 * np.exp(-K * e**2 / (2 * (2 + e)))", "return 2 * np.exp(-K**2 * e**2 / (2 * (2 + e)))"),
    ("Lemma A.4", "test_theory_lemma_a_4.py", "pixel_law.py",
     "        return nu\n", "        return sd\n"),
    ("Lemma A.4", "test_theory_lemma_a_4.py", "pixel_law.py",
     "scale, nc = self.a**2 / K, K * self.b**2 / self.a**2", "scale, nc = self.a**2 / K, self.b**2 / self.a**2"),
    ("Cor A.5", "test_theory_cor_a_5.py", "test_theory_cor_a_5.py",
     "right = (zmin > tau).mean(), ph**K", "right = (zmin > tau).mean(), ph ** (K - 1)"),
    ("Cor A.5", "test_theory_cor_a_5.py", "test_theory_cor_a_5.py",
     "zmin = draw_z(N * K).reshape(N, K).min(1)", "zmin = draw_z(N * K).reshape(N, K).mean(1)"),
    ("Cor A.6", "test_theory_cor_a_6.py", "test_theory_cor_a_6.py",
     "C = 6  #", "C = 1 / 2  #"),
    ("Cor A.6", "test_theory_cor_a_6.py", "test_theory_cor_a_6.py",
     "eps = C * nu * max(np.sqrt(L / K), L / K)", "eps = C * nu * L / K"),
    ("Prop 4.4", "test_theory_prop_4_4.py", "test_theory_prop_4_4.py",
     "assert_equal_to_rounding(endpoint_err2, (1 - t) ** 2 * r2)", "assert_equal_to_rounding(endpoint_err2, (1 - t) * r2)"),
    ("Prop 4.4", "test_theory_prop_4_4.py", "test_theory_prop_4_4.py",
     "sigma2 = ((1 - t) / t) ** 2", "sigma2 = (1 - t) / t"),
    ("Prop 4.4", "test_theory_prop_4_4.py", "test_theory_prop_4_4.py",
     "t**2 / (1 - t) ** 2 * endpoint_err2, t**2 * r2", "t**2 / (1 - t) ** 2 * endpoint_err2, t * r2"),
    ("Remark 4.5", "test_theory_remark_4_5.py", "test_theory_remark_4_5.py",
     "binom.cdf(j - 1, k, F(tau))", "binom.cdf(j, k, F(tau))"),
    ("Remark 4.5", "test_theory_remark_4_5.py", "test_theory_remark_4_5.py",
     "zmin, zavg = z.min(1), z.mean(1)", "zmin, zavg = z.mean(1), z.mean(1)"),
    ("Remark 4.5", "test_theory_remark_4_5.py", "test_theory_remark_4_5.py",
     "ncx2.cdf(tau / law.a**2, 1, (law.b / law.a) ** 2)", "ncx2.cdf(tau / law.a**2, 1, law.b / law.a)"),
    ("laboratory", "test_theory_laboratory.py", "gmm.py",
     "comp = rng.choice(self.k, size=n, p=self.weights)", "comp = rng.choice(self.k, size=n)"),
    ("laboratory", "test_theory_laboratory.py", "gmm.py",
     'return (1 - t) * np.einsum("nk,knd->nd", gamma, prec_diff)', 'return np.einsum("nk,knd->nd", gamma, prec_diff)'),
]


def pytest_in(root: Path, targets: list[str]) -> int:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--rootdir", str(root)]
    cmd += [f"theory/{t}" for t in targets]
    return subprocess.run(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def copy_theory(dst: Path) -> Path:
    shutil.copytree(HERE, dst / "theory", ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
    return dst


def run(mutation, tmp: Path, i: int) -> str:
    claim, target, fname, old, new = mutation
    root = copy_theory(tmp / f"m{i}")
    path = root / "theory" / fname
    src = path.read_text()
    if src.count(old) != 1:
        return f"not applicable ({src.count(old)} matches)"
    path.write_text(src.replace(old, new))
    rc = pytest_in(root, [target])
    return "caught" if rc == 1 else ("NOT CAUGHT" if rc == 0 else f"error (pytest exit {rc})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only claims whose name contains this text")
    ap.add_argument("-j", type=int, default=2, help="mutations run at once (default 2)")
    args = ap.parse_args()
    todo = [m for m in MUTATIONS if args.k in m[0]]
    start = time.time()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base_root = copy_theory(tmp / "base")
        with ThreadPoolExecutor(args.j) as pool:
            base = list(pool.map(lambda target: pytest_in(base_root, [target]), sorted({m[1] for m in todo})))
            if any(base):
                print(f"unmutated tests fail (pytest exit {max(base)}); fix them first")
                return 2
            results = list(pool.map(lambda im: run(im[1], tmp, im[0]), enumerate(todo)))
    width = max(len(m[0]) for m in todo)
    for (claim, _, fname, old, new), res in zip(todo, results):
        print(f"{claim:<{width}}  {res:<10}  {fname}: {old.strip()!r} -> {new.strip()!r}")
    caught = sum(r == "caught" for r in results)
    print(f"{caught}/{len(results)} caught, {time.time() - start:.0f} s")
    return 0 if caught == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
