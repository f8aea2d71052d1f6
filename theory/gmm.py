"""Gaussian mixtures: a laboratory where every quantity of the paper's theory has a closed form.

The theory (§4, App. A) studies the straight path x_t = (1 - t) x0 + t y with x0 ~ N(0, I)
independent of y ~ r. When r is a Gaussian mixture sum_k pi_k N(m_k, S_k), each component
makes (y, x0, x_t) jointly Gaussian, so the path marginal, its score, the posterior mean
E[Y | X_t = x] and the oracle velocity E[Y - X0 | X_t = x] are all exact. The tests in this
folder compare these exact objects with the paper's formulas (and with Monte Carlo).

    python -m pytest theory -q                         # every claim of §4 and App. A
    python -m pytest theory -q -k tweedie              # one claim
    python -c "from theory.gmm import GMM"             # use the laboratory elsewhere

All arrays are float64; points are rows, shape (n, d); t is a scalar in (0, 1).
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp


class GMM:
    """The law r = sum_k pi_k N(m_k, S_k) of the endpoint y, and its path quantities at time t.

    weights (k,), means (k, d), covs (k, d, d) symmetric positive definite.
    """

    def __init__(self, weights, means, covs):
        self.weights = np.asarray(weights, dtype=np.float64)
        self.means = np.asarray(means, dtype=np.float64)
        self.covs = np.asarray(covs, dtype=np.float64)
        self.k, self.d = self.means.shape
        assert self.weights.shape == (self.k,) and self.covs.shape == (self.k, self.d, self.d)
        assert np.isclose(self.weights.sum(), 1.0) and np.all(self.weights > 0)
        self._chol_y = np.linalg.cholesky(self.covs)  # raises unless every S_k is SPD

    def __repr__(self):
        return (f"GMM(weights={self.weights.tolist()!r}, means={self.means.tolist()!r}, "
                f"covs={self.covs.tolist()!r})")

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n endpoints y ~ r, shape (n, d)."""
        comp = rng.choice(self.k, size=n, p=self.weights)
        eps = rng.standard_normal((n, self.d))
        return self.means[comp] + np.einsum("nij,nj->ni", self._chol_y[comp], eps)

    def _per_component(self, t: float, x: np.ndarray):
        """Per component k: log pi_k N(x; t m_k, C_k) with C_k = t^2 S_k + (1-t)^2 I (n, k),
        and C_k^{-1} (x - t m_k) (k, n, d)."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        C = t**2 * self.covs + (1 - t) ** 2 * np.eye(self.d)  # Assumption A.1: x_t | y ~ N(ty, (1-t)^2 I)
        logp = np.empty((x.shape[0], self.k))
        prec_diff = np.empty((self.k,) + x.shape)
        for j in range(self.k):
            # d <= a few: explicit d x d inverses and einsum keep the n-point work out of
            # multithreaded BLAS, which is slow for tall-thin solves on a busy machine.
            L_inv = np.linalg.inv(np.linalg.cholesky(C[j]))
            diff = x - t * self.means[j]                                      # (n, d)
            white = np.einsum("ij,nj->ni", L_inv, diff)                       # L^{-1} diff
            prec_diff[j] = np.einsum("ji,nj->ni", L_inv, white)               # C^{-1} diff = L^{-T} L^{-1} diff
            logdet = -2.0 * np.log(np.diag(L_inv)).sum()
            logp[:, j] = (np.log(self.weights[j]) - 0.5 * (white**2).sum(1)
                          - 0.5 * logdet - 0.5 * self.d * np.log(2 * np.pi))
        return logp, prec_diff

    def log_density(self, t: float, x: np.ndarray) -> np.ndarray:
        """log r_t(x) for r_t = sum_k pi_k N(t m_k, t^2 S_k + (1-t)^2 I), shape (n,)."""
        logp, _ = self._per_component(t, x)
        return logsumexp(logp, axis=1)

    def responsibilities(self, t: float, x: np.ndarray) -> np.ndarray:
        """P(component k | X_t = x), shape (n, k)."""
        logp, _ = self._per_component(t, x)
        return np.exp(logp - logsumexp(logp, axis=1, keepdims=True))

    def score(self, t: float, x: np.ndarray) -> np.ndarray:
        """s_{r_t}(x) = grad log r_t(x) = -sum_k gamma_k(x) C_k^{-1} (x - t m_k), shape (n, d)."""
        logp, prec_diff = self._per_component(t, x)
        gamma = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        return -np.einsum("nk,knd->nd", gamma, prec_diff)

    def posterior_mean(self, t: float, x: np.ndarray) -> np.ndarray:
        """mu_r(x) = E[Y | X_t = x]: responsibilities times the Gaussian conditional mean of
        each component, m_k + t S_k C_k^{-1} (x - t m_k) (Cov(Y, X_t | k) = t S_k). Shape (n, d).

        Computed from Bayes' rule alone, without the score: Tweedie (Lemma 4.2) is a test.
        """
        logp, prec_diff = self._per_component(t, x)
        gamma = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        cond = self.means[:, None, :] + t * np.einsum("kij,knj->kni", self.covs, prec_diff)
        return np.einsum("nk,knd->nd", gamma, cond)

    def posterior_mean_x0(self, t: float, x: np.ndarray) -> np.ndarray:
        """E[X0 | X_t = x] = sum_k gamma_k(x) (1-t) C_k^{-1} (x - t m_k) (Cov(X0, X_t) = (1-t) I)."""
        logp, prec_diff = self._per_component(t, x)
        gamma = np.exp(logp - logsumexp(logp, axis=1, keepdims=True))
        return (1 - t) * np.einsum("nk,knd->nd", gamma, prec_diff)

    def velocity(self, t: float, x: np.ndarray) -> np.ndarray:
        """Oracle marginal velocity v_r(t, x) = E[Y - X0 | X_t = x] (§4.1, Thm 4.3), shape (n, d).

        Taken straight from the definition; Prop 4.1's proof shows it equals
        (mu_r(x) - x) / (1 - t), which the tests check rather than assume.
        """
        return self.posterior_mean(t, x) - self.posterior_mean_x0(t, x)


def conditional_score(t: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """s_{q_{t|y}}(x) = -(x - t y) / (1-t)^2, the score of X_t | y ~ N(t y, (1-t)^2 I) (Lemma 4.2 ii)."""
    return -(np.asarray(x) - t * np.asarray(y)) / (1 - t) ** 2


def random_gmm(rng: np.random.Generator, d: int, k: int, spread: float = 2.0,
               shift=0.0) -> GMM:
    """A random mixture for fixed-seed Monte Carlo tests: means ~ shift + spread * N(0, I),
    covariances B B^T / d + 0.1 I, weights ~ Dirichlet(2, ..., 2)."""
    means = shift + spread * rng.standard_normal((k, d))
    B = rng.standard_normal((k, d, d))
    covs = B @ B.transpose(0, 2, 1) / d + 0.1 * np.eye(d)
    return GMM(rng.dirichlet(2.0 * np.ones(k)), means, covs)


def low_rank_covs(rng: np.random.Generator, k: int, d: int, rank: int, floor: float = 1e-6) -> np.ndarray:
    """k image-like covariances U diag(l) U^T: `rank` eigenvalues log-uniform in [0.2, 2], the
    other d - rank equal to `floor` (a near-degenerate direction, as pixels of natural images
    have), U a random rotation per component. Shape (k, d, d)."""
    covs = np.empty((k, d, d))
    for j in range(k):
        U, _ = np.linalg.qr(rng.standard_normal((d, d)))
        lam = np.full(d, floor)
        lam[:rank] = np.exp(rng.uniform(np.log(0.2), np.log(2.0), rank))
        covs[j] = (U * lam) @ U.T
    return (covs + covs.transpose(0, 2, 1)) / 2


def image_like_gmm(rng: np.random.Generator, d: int, k: int, rank: int, floor: float = 1e-6,
                   spread: float = 2.0, shift=0.0) -> GMM:
    """A mixture of k nearly low-rank components (rank `rank`, other eigenvalues `floor`): a
    union of thin slabs around affine subspaces, the Gaussian stand-in for data near a
    low-dimensional set. Means ~ shift + spread * N(0, I), weights ~ Dirichlet(2, ..., 2)."""
    means = shift + spread * rng.standard_normal((k, d))
    return GMM(rng.dirichlet(2.0 * np.ones(k)), means, low_rank_covs(rng, k, d, rank, floor))


# ----------------------------------------------------------------------------------------------
# Gaussian closed forms, written from the eigenvalues and the Gaussian Fisher formula rather than
# by conditioning: the tests compare them with Monte Carlo through the GMM code above.

def gaussian_weighted_denoising(S: np.ndarray, t: float) -> float:
    """(t^2/(1-t)^2) D_r(t) for r = N(m, S): the posterior covariance of Y given X_t is
    S - t^2 S C^{-1} S, C = t^2 S + (1-t)^2 I, with eigenvalues l (1-t)^2 / (t^2 l + (1-t)^2),
    so the weighted term is sum_i t^2 l_i / (t^2 l_i + (1-t)^2) (l_i the eigenvalues of S)."""
    lam = np.linalg.eigvalsh(S)
    return float((t**2 * lam / (t**2 * lam + (1 - t) ** 2)).sum())


def gaussian_fisher(mq, Sq, mp, Sp, t: float) -> float:
    """J(q_t || p_t) = E_{q_t}||s_{q_t} - s_{p_t}||^2 for q = N(mq, Sq), p = N(mp, Sp). With
    u = X - t mq ~ N(0, Cq): s_q - s_p = (Cp^{-1} - Cq^{-1}) u + t Cp^{-1} (mq - mp), so
    J = tr(M Cq M) + t^2 ||Cp^{-1}(mq - mp)||^2 with M = Cp^{-1} - Cq^{-1}. S may be singular."""
    eye = np.eye(len(mq))
    Cq, Cp = t**2 * np.asarray(Sq) + (1 - t) ** 2 * eye, t**2 * np.asarray(Sp) + (1 - t) ** 2 * eye
    Pq, Pp = np.linalg.inv(Cq), np.linalg.inv(Cp)
    M = Pp - Pq
    shift = t * Pp @ (np.asarray(mq) - np.asarray(mp))
    return float(np.trace(M @ Cq @ M) + shift @ shift)
