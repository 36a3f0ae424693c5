"""Gaussian mixtures: data whose ideal denoiser, score, density and samples are known exactly.

For data p(x) = sum_k w_k N(x; mu_k, C_k) and x~ = x + sigma * eps, eps ~ N(0, I), the noisy
density is again a mixture (Bishop 2006, PRML eq. 2.115):

    p_sigma(x~) = sum_k w_k N(x~; mu_k, C_k + sigma^2 I),

and the ideal denoiser D(x~, sigma) = E[x | x~] of Karras et al. (2022, eq. 2-3) is the mixture
of the per-component Gaussian posterior means (Wiener filters, PRML eq. 2.116 / 2.141),

    D(x~, sigma) = sum_k r_k(x~) [mu_k + C_k (C_k + sigma^2 I)^{-1} (x~ - mu_k)],
    r_k(x~) = w_k N(x~; mu_k, C_k + sigma^2 I) / p_sigma(x~)      (responsibilities, PRML eq. 9.13)

which equals x~ + sigma^2 grad log p_sigma(x~) (Tweedie's formula: Robbins 1956; Efron 2011).

Each full covariance is stored once by its eigendecomposition, split into an isotropic bulk and
r "spikes": C_k = f_k I + V_k diag(lam_k - f_k) V_k^T with V_k (d, r) orthonormal (r = d unless
many eigenvalues coincide, as for low-rank-plus-isotropic covariances), so that for every sigma

    (C_k + sigma^2 I)^{-1} = I / (f_k + sigma^2) + V_k diag(1/(lam_k + sigma^2) - 1/(f_k + sigma^2)) V_k^T:

nothing is factorised per call, a per-sample sigma of shape (B,) costs one broadcast, and a call
costs O(B K d r). Diagonal covariances take an elementwise path.
All arithmetic is float64; results come back in the input's dtype on the input's device.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor
F64 = torch.float64


class GaussianMixture:
    """p(x) = sum_k w_k N(x; mu_k, C_k) with exact sampling, noisy density, score and denoiser.

    weights (K,) >= 0 (normalised to sum 1), means (K, d), covs (K, d) diagonal variances or
    (K, d, d) symmetric positive definite covariances. Bad input raises ValueError.
    A mixture is a denoiser callable: `gm(x, sigma)` is `gm.denoiser(x, sigma)`.
    """

    def __init__(self, weights, means, covs):
        w = torch.as_tensor(weights, dtype=F64).detach().cpu()
        mu = torch.as_tensor(means, dtype=F64).detach().cpu()
        c = torch.as_tensor(covs, dtype=F64).detach().cpu()
        if w.ndim != 1 or not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or w.sum() <= 0:
            raise ValueError(f"weights must be a 1-D tensor of finite values >= 0 with positive sum, got {w.tolist()}")
        if mu.ndim != 2 or mu.shape[0] != w.shape[0] or not bool(torch.isfinite(mu).all()):
            raise ValueError(f"means must be finite with shape (K, d) = ({w.shape[0]}, d), got {tuple(mu.shape)}")
        K, d = mu.shape
        if c.shape not in ((K, d), (K, d, d)):
            raise ValueError(f"covs must have shape (K, d) = {(K, d)} or (K, d, d) = {(K, d, d)}, got {tuple(c.shape)}")
        if not bool(torch.isfinite(c).all()):
            raise ValueError("covs must be finite")
        if c.ndim == 3 and torch.equal(c, torch.diag_embed(c.diagonal(dim1=-2, dim2=-1))):
            c = c.diagonal(dim1=-2, dim2=-1)  # diagonal matrices take the diagonal path
        if c.ndim == 3:
            asym = (c - c.mT).abs().amax(dim=(-2, -1))
            bad = asym > 1e-10 * c.abs().amax(dim=(-2, -1))
            if bool(bad.any()):
                k = int(bad.nonzero()[0])
                raise ValueError(f"covs[{k}] is not symmetric (max |C - C^T| = {asym[k]:.3g})")
            lam, U = torch.linalg.eigh((c + c.mT) / 2)
        else:
            lam, U = c, None
        if bool((lam <= 0).any()):
            k = int((lam <= 0).any(-1).nonzero()[0])
            raise ValueError(f"covs[{k}] is not positive definite (smallest eigenvalue/variance {lam[k].min():.3g})")
        self.weights, self.means, self.lam, self.U = w / w.sum(), mu, lam, U
        self.covs = c if c.ndim == 3 else torch.diag_embed(c)
        self.K, self.dim = K, d
        self._cache: dict[str, dict] = {}

    # -- mixture moments --------------------------------------------------------------------------
    @property
    def mean(self) -> Tensor:
        """E[x] = sum_k w_k mu_k, shape (d,), float64."""
        return self.weights @ self.means

    @property
    def covariance(self) -> Tensor:
        """Cov[x] = sum_k w_k (C_k + mu_k mu_k^T) - E[x] E[x]^T (law of total covariance), (d, d)."""
        m = self.mean
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return second - torch.outer(m, m)

    @property
    def sigma_data(self) -> float:
        """sqrt(trace(Cov[x]) / d): the per-dimension data standard deviation (Karras et al. 2022, sec. 5)."""
        return math.sqrt(float(self.covariance.trace()) / self.dim)

    # -- exact sampling ---------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """n exact samples (n, d) float64: k ~ Cat(w), x = mu_k + U_k diag(sqrt(lam_k)) z, z ~ N(0, I).

        Drawn on the generator's device (CPU without one). With return_labels=True, returns (x, k) with
        k (n,) int64 the component of each sample (ancestral sampling, PRML sec. 8.1.2); x is the same
        draw either way."""
        device = generator.device if generator is not None else torch.device("cpu")
        p = self._on(device)
        k = torch.multinomial(p["w"], n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=F64, device=device) * p["lam"][k].sqrt()
        if p["U"] is None:
            x = p["mu"][k] + z
        else:
            x = torch.empty_like(z)
            for j in range(self.K):
                m = k == j
                x[m] = p["mu"][j] + z[m] @ p["U"][j].mT
        return (x, k) if return_labels else x

    # -- noisy density, score, denoiser -----------------------------------------------------------
    def log_prob(self, x: Tensor, sigma=0.0) -> Tensor:
        """log p_sigma(x) = logsumexp_k [log w_k + log N(x; mu_k, C_k + sigma^2 I)], shape (B,).

        Density of x~ = x0 + sigma eps (PRML eq. 2.115); differentiable in x."""
        x64, s = self._prepare(x, sigma)
        return torch.logsumexp(self._joint(x64, s)[0], dim=-1).to(self._out_dtype(x))

    def score(self, x: Tensor, sigma) -> Tensor:
        """grad_x log p_sigma(x) = -sum_k r_k(x) (C_k + sigma^2 I)^{-1} (x - mu_k), shape (B, d).

        r_k are the posterior responsibilities (PRML eq. 9.13), computed with log-sum-exp."""
        x64, s = self._prepare(x, sigma)
        return -self._precision_residual(x64, s).to(self._out_dtype(x))

    def denoiser(self, x: Tensor, sigma) -> Tensor:
        """Ideal denoiser E[x0 | x~ = x] = sum_k r_k(x) m_k(x), shape (B, d), with the Gaussian posterior
        means (Wiener filters, PRML eq. 2.116)

            m_k = mu_k + C_k (C_k + sigma^2 I)^{-1} (x - mu_k) = x - sigma^2 (C_k + sigma^2 I)^{-1} (x - mu_k),

        so D = x + sigma^2 score(x, sigma) (Tweedie: Robbins 1956; Efron 2011); x itself at sigma = 0.
        At sigma = inf (zero SNR: x holds the unit noise, samplers' convention) the limit E[x0] = `mean`."""
        x64, s = self._prepare(x, sigma, allow_inf=True)
        inf = torch.isinf(s)
        s = torch.where(inf, torch.zeros_like(s), s)
        out = x64 - (s * s)[:, None] * self._precision_residual(x64, s)
        return torch.where(inf[:, None], self.mean.to(x.device), out).to(self._out_dtype(x))

    __call__ = denoiser

    # -- component labels: noise-conditional classifier and class-conditional denoiser -------------
    def log_posterior(self, x: Tensor, sigma=0.0) -> Tensor:
        """log p(y = k | x~ = x, sigma) = log w_k + log N(x; mu_k, C_k + sigma^2 I) - log p_sigma(x), (B, K).

        The exact noise-conditional classifier when the labels are the components: Bayes' rule for the
        responsibilities (PRML eq. 9.13) on the noisy mixture (PRML eq. 2.115), via log-softmax.
        Differentiable in x, so sigma^2 grad_x log p(y | x~) is the exact classifier-guidance term."""
        x64, s = self._prepare(x, sigma)
        return torch.log_softmax(self._joint(x64, s)[0], dim=-1).to(self._out_dtype(x))

    def conditional_denoiser(self, x: Tensor, sigma, labels) -> Tensor:
        """E[x0 | x~ = x, y = k] = mu_k + C_k (C_k + sigma^2 I)^{-1} (x - mu_k), shape (B, d).

        The Wiener filter of component k alone (PRML eq. 2.116), k = labels[b] per sample (labels (B,)
        or one int for all, integers in [0, K)); computed from the eigendecomposition C_k = U_k
        diag(lam_k) U_k^T as mu_k + U_k diag(lam_k / (lam_k + sigma^2)) U_k^T (x - mu_k).
        Bayes: sum_k p(k | x~) E[x0 | x~, k] = denoiser(x~), and E[x0 | x~, k] = denoiser(x~) +
        sigma^2 grad_x log p(k | x~) (classifier guidance, Dhariwal & Nichol 2021, with guidance scale 1)."""
        x64, s = self._prepare(x, sigma)
        k = torch.as_tensor(labels, device=x.device)
        if k.dtype.is_floating_point or k.dtype.is_complex or k.dtype == torch.bool:
            raise ValueError(f"labels must be integers in [0, {self.K}), got dtype {k.dtype}")
        k = k.long().expand(x.shape[0]) if k.ndim == 0 else k.long()
        if k.shape != (x.shape[0],):
            raise ValueError(f"labels must be an int or have shape ({x.shape[0]},), got shape {tuple(k.shape)}")
        bad = (k < 0) | (k >= self.K)
        if bool(bad.any()):
            raise ValueError(f"labels must lie in [0, {self.K}), got {k[bad][:3].tolist()}")
        mu, lam = self.means.to(x.device)[k], self.lam.to(x.device)[k]
        g = lam / (lam + (s * s)[:, None])  # shrinkage of each eigen-direction; 1 at sigma = 0
        y = x64 - mu
        if self.U is None:
            return (mu + g * y).to(self._out_dtype(x))
        U = self.U.to(x.device)[k]  # (B, d, d)
        return (mu + (U @ (g * (y[:, None, :] @ U)[:, 0])[..., None])[..., 0]).to(self._out_dtype(x))

    # -- sub-mixtures and conditioning on coordinates ----------------------------------------------
    def component(self, k: int) -> GaussianMixture:
        """Component k alone, N(mu_k, C_k), as a one-component mixture."""
        if isinstance(k, bool) or not hasattr(k, "__index__") or not 0 <= int(k) < self.K:
            raise ValueError(f"component index must be an int in [0, {self.K}), got {k!r}")
        k = int(k)
        return GaussianMixture(torch.ones(1, dtype=F64), self.means[k : k + 1], self.covs[k : k + 1])

    def condition(self, mask, values) -> GaussianMixture:
        """The exact law p(x_U | x_K = values) of the unknown coordinates U given the known ones K.

        mask (d,) bool, True = known; values (d,) (entries at unknown coordinates ignored) or (n_known,).
        Each component conditions as a Gaussian (PRML eq. 2.81-2.82),

            mu'_k = mu_k,U + C_k,UK C_k,KK^{-1} (x_K - mu_k,K),   C'_k = C_k,UU - C_k,UK C_k,KK^{-1} C_k,KU,

        and the weights follow Bayes' rule on the marginals p(x_K) = sum_k w_k N(x_K; mu_k,K, C_k,KK)
        (PRML eq. 2.98 for the marginal), w'_k = w_k N(x_K; mu_k,K, C_k,KK) / p(x_K), in log-sum-exp."""
        m = torch.as_tensor(mask).detach().cpu()
        if m.dtype != torch.bool or m.shape != (self.dim,):
            raise ValueError(f"mask must be a bool tensor of shape ({self.dim},), "
                             f"got {m.dtype} of shape {tuple(m.shape)}")
        nk = int(m.sum())
        if nk == 0 or nk == self.dim:
            raise ValueError(f"mask must mark at least one known and one unknown coordinate, "
                             f"got {nk} known of {self.dim}")
        v = torch.as_tensor(values, dtype=F64).detach().cpu()
        if v.shape == (self.dim,):
            v = v[m]
        if v.shape != (nk,):
            raise ValueError(f"values must have shape ({self.dim},) or (n_known,) = ({nk},), got {tuple(v.shape)}")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("values must be finite")
        C, mu = self.covs, self.means
        C_KK, C_UK, C_UU = C[:, m][:, :, m], C[:, ~m][:, :, m], C[:, ~m][:, :, ~m]
        L = torch.linalg.cholesky(C_KK)
        y = (v - mu[:, m])[..., None]  # (K, nk, 1)
        z = torch.linalg.solve_triangular(L, y, upper=False)  # L^{-1} (x_K - mu_K)
        A = torch.linalg.solve_triangular(L, C_UK.mT, upper=False)  # L^{-1} C_KU, (K, nk, nu)
        logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        log_n = -0.5 * ((z * z).sum((-2, -1)) + logdet + nk * math.log(2 * math.pi))  # log N(x_K; mu_K, C_KK)
        w = torch.softmax(self.weights.log() + log_n, dim=0)
        mu_c = mu[:, ~m] + (A.mT @ z)[..., 0]
        C_c = C_UU - A.mT @ A
        return GaussianMixture(w, mu_c, (C_c + C_c.mT) / 2)

    # -- internals --------------------------------------------------------------------------------
    def _on(self, device) -> dict:
        """Parameters on `device` (cached). Full covariances: the bulk eigenvalue f (K,), the r spikes
        lam_r (K, r) with eigenvectors V_flat[i, k*r + j] = V_k[i, j], and centred means."""
        key = str(device)
        if key not in self._cache:
            p = dict(w=self.weights, logw=self.weights.log(), mu=self.means, lam=self.lam, U=self.U)
            if self.U is not None:
                f = self.lam.median(dim=-1).values  # the bulk: eigenvalues equal to f up to rounding
                off = (self.lam - f[:, None]).abs()
                r = int((off > 1e-12 * self.lam.amax(-1, keepdim=True)).sum(-1).max())
                idx = off.topk(r, dim=-1).indices
                V = self.U.gather(2, idx[:, None, :].expand(-1, self.dim, -1))
                mu_c = self.means - self.mean  # centred, for an accurate |x - mu_k|^2 by matmul
                p.update(f=f, lam_r=self.lam.gather(1, idx), V_flat=V.permute(1, 0, 2).reshape(self.dim, -1),
                         centre=self.mean, mu_c=mu_c, mu_c2=(mu_c * mu_c).sum(-1),
                         V_mu=-torch.einsum("ki,kij->kj", mu_c, V).reshape(-1))
            self._cache[key] = {n: (None if t is None else t.to(device)) for n, t in p.items()}
        return self._cache[key]

    def _prepare(self, x: Tensor, sigma, allow_inf: bool = False) -> tuple[Tensor, Tensor]:
        """x as float64 (B, d); sigma as float64 (1,) or (B,), validated finite (or inf if allow_inf) and >= 0."""
        if x.ndim != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        s = torch.as_tensor(sigma, dtype=F64, device=x.device).reshape(-1)
        if s.numel() not in (1, x.shape[0]):
            raise ValueError(f"sigma must be a scalar or have {x.shape[0]} entries, got shape {tuple(s.shape)}")
        ok = (torch.isfinite(s) | (allow_inf & torch.isinf(s))) & (s >= 0)
        if not bool(ok.all()):
            raise ValueError(f"sigma must be finite{' or inf' if allow_inf else ''} and >= 0, got {s[~ok][:3].tolist()}")
        if s.numel() > 1 and bool((s == s[0]).all()):
            s = s[:1]  # one shared noise level: the sigma-dependent terms broadcast over the batch
        return x.to(F64), s

    def _joint(self, x: Tensor, s: Tensor) -> tuple[Tensor, tuple]:
        """log w_k + log N(x; mu_k, C_k + s^2 I), shape (B, K), and the pieces of (C_k + s^2 I)^{-1} (x - mu_k)."""
        p, (B, d) = self._on(x.device), x.shape
        s2 = (s * s)[:, None]
        if p["U"] is None:
            y = x[:, None, :] - p["mu"]
            v = p["lam"] + s2[..., None]
            q = y / v  # (C_k + s^2 I)^{-1} (x - mu_k)
            maha, logdet, parts = (y * q).sum(-1), v.log().sum(-1), (q,)
        else:
            xc = x - p["centre"]
            dist2 = ((xc * xc).sum(-1, keepdim=True) - 2 * xc @ p["mu_c"].mT + p["mu_c2"]).clamp_min(0)
            y = torch.addmm(p["V_mu"], xc, p["V_flat"]).view(B, self.K, -1)  # V_k^T (x - mu_k)
            v0, vr = p["f"] + s2, p["lam_r"] + s2[..., None]
            c = 1 / vr - 1 / v0[..., None]
            maha = dist2 / v0 + (y * y * c).sum(-1)
            logdet = (d - vr.shape[-1]) * v0.log() + vr.log().sum(-1)
            parts = (xc, v0, c * y)
        logj = p["logw"] - 0.5 * (maha + logdet + d * math.log(2 * math.pi))
        return logj, parts

    def _precision_residual(self, x: Tensor, s: Tensor) -> Tensor:
        """sum_k r_k(x) (C_k + s^2 I)^{-1} (x - mu_k) = -score, shape (B, d)."""
        logj, parts = self._joint(x, s)
        r = torch.softmax(logj, dim=-1)
        if len(parts) == 1:
            return torch.einsum("bk,bkd->bd", r, parts[0])
        p, (xc, v0, cy) = self._on(x.device), parts
        rv = r / v0
        return xc * rv.sum(-1, keepdim=True) - rv @ p["mu_c"] + (r[..., None] * cy).flatten(1) @ p["V_flat"].mT

    @staticmethod
    def _out_dtype(x: Tensor) -> torch.dtype:
        return x.dtype if x.is_floating_point() else F64

    def __repr__(self) -> str:
        kind = "diagonal" if self.U is None else "full"
        return f"GaussianMixture(K={self.K}, dim={self.dim}, {kind} covariances, sigma_data={self.sigma_data:.4g})"


# -- ready-made mixtures ----------------------------------------------------------------------------
def ring8(radius: float = 1.0, std: float = 0.05) -> GaussianMixture:
    """8 equal isotropic Gaussians N(radius (cos 2 pi k/8, sin 2 pi k/8), std^2 I) on a circle (2-D).

    The classic 2-D toy of GAN / diffusion papers (e.g. Metz et al. 2017, unrolled GANs)."""
    a = torch.arange(8, dtype=F64) * (2 * math.pi / 8)
    means = radius * torch.stack([a.cos(), a.sin()], dim=1)
    return GaussianMixture(torch.ones(8), means, torch.full((8, 2), std**2, dtype=F64))


def checkerboard(n: int = 4, size: float = 2.0, per_cell: int = 3) -> GaussianMixture:
    """The dark squares of an n x n board on [-size/2, size/2]^2 (2-D), each a per_cell x per_cell grid
    of equal isotropic Gaussians.

    Each small Gaussian has the variance (size / (n per_cell))^2 / 12 of a uniform sub-cell, so the
    mixture matches the first two moments of the uniform checkerboard of Grathwohl et al. (2019, FFJORD)."""
    sub = size / (n * per_cell)
    centres = [((i * per_cell + a + 0.5) * sub - size / 2, (j * per_cell + b + 0.5) * sub - size / 2)
               for i in range(n) for j in range(n) if (i + j) % 2 == 0
               for a in range(per_cell) for b in range(per_cell)]
    means = torch.tensor(centres, dtype=F64)
    return GaussianMixture(torch.ones(len(means)), means, torch.full_like(means, sub**2 / 12))


def image_like64(K: int = 32, seed: int = 0, rank: int = 4, sigma_data: float = 0.5) -> GaussianMixture:
    """A 64-D (8 x 8 'image') mixture of K Gaussians with full low-rank-plus-diagonal covariances.

    Means and covariance factors are smooth patterns: random combinations of the 2-D cosine basis
    cos(pi a u) cos(pi b v), a, b < 4, with coefficient variance 1 / (1 + a^2 + b^2) (a 1/f-like
    spectrum, Field 1987). C_k = A_k A_k^T + 0.05^2 I with A_k (64, rank). The whole mixture is then
    scaled about the origin so that sqrt(trace(Cov)/64) = sigma_data exactly (0.5, as for images
    in [-1, 1] in Karras et al. 2022, sec. 5)."""
    g = torch.Generator().manual_seed(seed)
    u = (torch.arange(8, dtype=F64) + 0.5) / 8
    freq = torch.arange(4, dtype=F64)
    cos = torch.cos(math.pi * freq[:, None] * u)  # (4, 8)
    basis = torch.einsum("ai,bj->abij", cos, cos).reshape(16, 64)
    spec = (1 / (1 + freq[:, None] ** 2 + freq**2)).sqrt().reshape(16)

    def patterns(*shape):
        return (torch.randn(*shape, 16, generator=g, dtype=F64) * spec) @ basis

    means = patterns(K)
    A = 0.3 * patterns(K, rank).mT  # (K, 64, rank)
    covs = A @ A.mT + 0.05**2 * torch.eye(64, dtype=F64)
    weights = torch.rand(K, generator=g, dtype=F64) + 0.5
    scale = sigma_data / GaussianMixture(weights, means, covs).sigma_data
    return GaussianMixture(weights, scale * means, scale**2 * covs)


MIXTURES = {"ring8": ring8, "checkerboard": checkerboard, "image64": image_like64}
