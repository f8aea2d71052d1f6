"""Print every number quoted in theory/README.md, from the same code and seeds as the tests.

    python -m theory.numbers          # about 1 min on 2 cores
"""

import warnings

import numpy as np
from hypothesis import given
from scipy.optimize import brentq

from theory.gmm import gaussian_fisher, gaussian_weighted_denoising, random_gmm
from theory.pixel_law import PixelLaw
from theory.strategies import FAMILIES, THEORY, mean_se, quantile, scenes
from theory.test_theory_cor_a_6 import LAWS, failure
from theory.test_theory_lemma_a_4 import CASES, E_OVER_NU, bernstein, lemma
from theory.test_theory_prop_a_2 import bridge_draws
from theory.test_theory_remark_4_5 import order_stat_mean
from theory.test_theory_thm_4_3 import gaussian_pair


def rounding():
    worst = {}
    for family in FAMILIES:
        errs = []

        @THEORY
        @given(scenes(family))
        def run(scene):
            p, q, t, x0, y = scene
            x = (1 - t) * x0 + t * y
            for r in (p, q):
                a, b = r.posterior_mean(t, x), x / t + (1 - t) ** 2 / t * r.score(t, x)
                errs.append(np.abs(a - b).max() / (1 + max(np.abs(a).max(), np.abs(b).max())))
        run()
        worst[family] = max(errs)
    print("Rounding: largest relative Tweedie error over the drawn scenes:",
          ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def finding_1_and_3():
    t, a, b = 0.5, 0.1, 0.1
    L, E, G = bridge_draws(t, 0.0)
    k = (1 - t) / t
    rhs = k**2 * np.maximum(quantile(G, a, axis=1) - quantile(E / k, 1 - b, axis=1), 0) ** 2
    print("\nFinding 1 (t = 0.5, a = b = 0.1, 8 endpoints): right side", np.round(rhs, 2))
    print("  left side with E~: ", quantile(E**2, a + b, axis=1))
    print("  left side with L~: ", np.round(quantile(L**2, a + b, axis=1), 2))
    print("\nFinding 3 (t = 0.8, a = 0.1, b = 0.05, mean over 8 endpoints of the two sides of (11)):")
    t, a, b = 0.8, 0.1, 0.05
    for field in ["smooth", "adversarial"]:
        L, E, G = bridge_draws(t, 1.0, field)
        lhs = quantile(L, a + b, axis=1).mean()
        rhs = np.maximum((1 - t) / t * quantile(G, a, axis=1) - quantile(E, 1 - b, axis=1), 0).mean()
        print(f"  {field:<12} eta = 1: left {lhs:.3f}, right {rhs:.3f}")
    print("  zero error: slack (Q_{a+b}(L) - Q_a(L)) / Q_a(L), mean over endpoints")
    for t, a in [(0.5, 0.1), (0.5, 0.5), (0.8, 0.1)]:
        L, _, _ = bridge_draws(t, 0.0)
        qa = quantile(L, a, axis=1)
        s = [((quantile(L, a + b, axis=1) - qa) / qa).mean() for b in (0.05, 0.01)]
        print(f"    t = {t}, a = {a}: b = 0.05 {100 * s[0]:.1f} %, b = 0.01 {100 * s[1]:.1f} %")


def finding_4():
    print("\nFinding 4 (Lemma A.4, exact tails): largest c with tail <= 2 exp(-c K min(e^2/nu^2, e/nu))")
    for t, y, s2 in CASES:
        law = PixelLaw(t, y, s2)
        nu = law.psi1()
        cmax = min(-np.log(max(law.tail(K, e * nu), 1e-300) / 2) / (K * min(e * e, e))
                   for K, es in E_OVER_NU.items() for e in es)
        sd = np.sqrt(2 * law.a**4 + 4 * law.a**2 * law.b**2)
        print(f"  t = {t}, y = {y}: nu = {nu:.3f} (sd {sd:.3f}), c_max = {cmax:.2f}")
    law = PixelLaw(0.3, 4.0, 0.5)
    nu = law.psi1()
    print("  t = 0.3, y = 4:  K, e/nu, exact tail, Bernstein, c = 1/6 form")
    for K, es in E_OVER_NU.items():
        for e in es:
            print(f"    {K:>3} {e:5.2f}  {law.tail(K, e * nu):.2e}  {bernstein(K, e):.3g}  {lemma(K, e):.3g}")
    nu, M, delta = max(law.psi1() for law in LAWS), len(LAWS), 0.1
    L = np.log(2 * M / delta)
    print(f"  Cor A.6 (M = 24, delta = 0.1, nu = {nu:.2f}): K, failure with C = 6, smallest C with failure <= delta")
    for K in [20, 200, 2000]:
        s = nu * max(np.sqrt(L / K), L / K)
        print(f"    {K:>5}  {failure(K, 6 * s):.1e}  {brentq(lambda C: failure(K, C * s) - delta, 0.01, 6):.2f}")


def finding_5():
    print("\nFinding 5 (Gaussian closed forms, d = 6; the t^2-weighted oracle mismatch):")
    print("  law        t       normal y ~ p   anomalous y ~ q   of which (1-t)^2 J")
    for law in ["full_rank", "low_rank"]:
        p, q = gaussian_pair(law)
        for t in [0.5, 0.9, 0.99, 0.999, 0.9999]:
            fisher = (1 - t) ** 2 * gaussian_fisher(q.means[0], q.covs[0], p.means[0], p.covs[0], t)
            normal, anom = gaussian_weighted_denoising(p.covs[0], t), gaussian_weighted_denoising(q.covs[0], t) + fisher
            print(f"  {law:<9} {t:<7} {normal:12.4f} {anom:17.4g} {fisher:19.4g}")
    rng = np.random.default_rng(3)                       # test_thm_4_3_weighted_denoising_bound
    q = random_gmm(rng, 5, 4, shift=1.0)
    t, n = 0.999, 100_000
    y, x0 = q.sample(n, rng), rng.standard_normal((n, 5))
    x = (1 - t) * x0 + t * y
    w, se = mean_se(t**2 / (1 - t) ** 2 * ((y - q.posterior_mean(t, x)) ** 2).sum(1))
    print(f"  4-component full-rank mixture, d = 5, t = 0.999: {w:.4f} +- {se:.4f}")
    print("\n§4.3, 1-D p = N(0, eps), q = N(1, 1): (1-t)^2 J(q_t || p_t)")
    for eps in [1e-4, 1e-6, 0.0]:
        vals = [(1 - t) ** 2 * gaussian_fisher([1.0], [[1.0]], [0.0], [[eps]], t) for t in [0.9, 0.99, 0.999, 0.9999]]
        print(f"  eps = {eps:g}: t = 0.9, 0.99, 0.999, 0.9999 ->", ", ".join(f"{v:.4g}" for v in vals))


def remark_4_5():
    print("\nRemark 4.5 (K = 10, t = 0.5, p = N(0, 0.5)): E min, E Z_(2), E Z_(3), mean m, E min / m")
    frac = {}
    for y in [0.5, 4.0]:
        law = PixelLaw(0.5, y, 0.5)
        e = [order_stat_mean(law, j) for j in (1, 2, 3)]
        frac[y] = (e[0], law.m)
        print(f"  y = {y}: " + ", ".join(f"{v:.4g}" for v in e + [law.m]) + f", {e[0] / law.m:.3f}")
    (n_min, n_m), (a_min, a_m) = frac[0.5], frac[4.0]
    print(f"  contrast anomalous/normal: mean {a_m / n_m:.1f}, min {a_min / n_min:.1f} (x{(a_min / n_min) / (a_m / n_m):.1f})")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    rounding()
    finding_1_and_3()
    finding_4()
    finding_5()
    remark_4_5()
