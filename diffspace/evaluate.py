"""Sample-quality measures, always next to their noise floor.

* `sliced_wasserstein`: SW2 between two point clouds (Bonneel et al. 2015), the 2-D and
  low-dimensional workhorse; `noise_floor` is the same distance between two independent true
  sample sets of the same size, the value a perfect model would get.
* `DigitsClassifier`: a logistic-regression classifier fit on the real scikit-learn digits; it
  reports how many generated digits it recognises confidently and how the classes are covered.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def sliced_wasserstein(a: Tensor, b: Tensor, n_proj: int = 512, generator: torch.Generator | None = None) -> float:
    """Sliced 2-Wasserstein distance sqrt(E_theta W2^2(theta.a, theta.b)) over random unit directions
    theta (Bonneel et al. 2015; Rabin et al. 2011). a, b: (N, ...) with the same N (flattened per sample);
    in 1-D, W2 between equal-size empirical measures pairs the sorted values."""
    a, b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    theta = torch.randn(a.shape[1], n_proj, generator=g, dtype=torch.float64)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(a.device)
    pa, _ = torch.sort(a @ theta, dim=0)
    pb, _ = torch.sort(b @ theta, dim=0)
    return float(((pa - pb) ** 2).mean().sqrt())


def energy_distance(a: Tensor, b: Tensor) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| (Szekely & Rizzo 2013), >= 0 and 0 only
    for equal distributions; the within-set means exclude the zero diagonal (unbiased U-statistics)."""
    a, b = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    within = lambda z: torch.cdist(z, z).sum() / (len(z) * (len(z) - 1))
    return float(2 * torch.cdist(a, b).mean() - within(a) - within(b))


def noise_floor(sample_true, n: int, seed: int = 0, n_proj: int = 512) -> float:
    """SW2 between two independent true sample sets of size n: `sample_true(n, generator)`."""
    g1, g2 = torch.Generator().manual_seed(seed + 101), torch.Generator().manual_seed(seed + 202)
    return sliced_wasserstein(sample_true(n, g1), sample_true(n, g2), n_proj)


class DigitsClassifier:
    """Multinomial logistic regression on the real 8x8 digits, scaled as data.load('digits') does
    (x / 8 - 1 in [-1, 1]). Its test accuracy on held-out real digits is in `accuracy`."""

    def __init__(self, seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split

        raw = load_digits()
        x = raw.data / 8.0 - 1.0
        xtr, xte, ytr, yte = train_test_split(x, raw.target, test_size=0.25, random_state=seed, stratify=raw.target)
        self.model = LogisticRegression(max_iter=2000, C=1.0).fit(xtr, ytr)
        self.accuracy = float(self.model.score(xte, yte))

    def probabilities(self, images: Tensor):
        """Class probabilities (N, 10) of images (N, 1, 8, 8) in [-1, 1] (clamped)."""
        x = images.detach().float().clamp(-1, 1).reshape(len(images), -1).cpu().numpy()
        return self.model.predict_proba(x)

    def report(self, images: Tensor, threshold: float = 0.8) -> dict:
        """confident: fraction with top probability >= threshold; class_fractions: predicted-class shares."""
        p = self.probabilities(images)
        top = p.argmax(1)
        fractions = [float((top == k).mean()) for k in range(p.shape[1])]
        import numpy as np

        marginal = p.mean(0, keepdims=True)
        kl = (p * (np.log(p + 1e-12) - np.log(marginal + 1e-12))).sum(1)
        return {
            "n": len(p),
            "confident": float((p.max(1) >= threshold).mean()),
            "classifier_score": float(np.exp(kl.mean())),  # Inception-Score form exp E KL(p(y|x) || p(y)), max 10
            "class_fractions": fractions,
            "min_class_fraction": min(fractions),
            "classifier_accuracy": self.accuracy,
        }


# -- likelihood through the probability-flow ODE ----------------------------------------------------
def _divergence(f, x: Tensor, probe: Tensor | None) -> tuple[Tensor, Tensor]:
    """(f(x), div_x f(x)) per sample: exact (one backward pass per dimension) when probe is None,
    else Hutchinson's unbiased estimate probe . (J_f probe) (Hutchinson 1989; FFJORD, Grathwohl et al. 2019)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = f(x)
        flat = out.reshape(len(x), -1)
        if probe is not None:
            (jvp,) = torch.autograd.grad(out, x, probe)
            return out.detach(), (jvp * probe).reshape(len(x), -1).sum(1)
        div = torch.zeros(len(x), dtype=x.dtype, device=x.device)
        for i in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=i + 1 < flat.shape[1])
            div = div + g.reshape(len(x), -1)[:, i]
    return out.detach(), div


def pf_ode_nll(denoiser, x: Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, steps: int = 64,
               exact: bool | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Negative log-likelihood (nats per sample) of x under the model's probability-flow ODE
    (Song et al. 2021, 'Score-Based Generative Modeling through SDEs', Appendix D.2).

    In the scale-free form x~ = x + sigma eps, the ODE is dx/dsigma = f = (x - D(x, sigma)) / sigma
    (Karras et al. 2022, eq. 4 with s = 1), and along its solution
        d log p_sigma(x(sigma)) / dsigma = -div f,
    so  log p_{sigma_min}(x) = log N(x(sigma_max); 0, sigma_max^2 I) + int_{sigma_min}^{sigma_max} div f dsigma.
    The integral runs in u = log sigma (dx/du = sigma f) with `steps` classical RK4 steps. The
    divergence is exact for dimension <= 64 (or exact=True), Hutchinson's estimator with one
    Rademacher probe per sample, fixed along the path, above. The result is the density of x plus
    N(0, sigma_min^2) noise, the quantity the ODE defines."""
    n = len(x)
    dim = x[0].numel()
    exact = dim <= 64 if exact is None else exact
    probe = None
    if not exact:
        g = generator if generator is not None else torch.Generator(device=x.device).manual_seed(0)
        probe = torch.randint(0, 2, x.shape, generator=g, device=x.device).to(x.dtype) * 2 - 1

    def field(xx: Tensor, u: float) -> tuple[Tensor, Tensor]:
        sigma = math.exp(u)
        s = torch.full((n,), sigma, dtype=xx.dtype, device=xx.device)
        return _divergence(lambda y: y - denoiser(y, s), xx, probe)  # sigma f = x - D; div(sigma f) likewise

    u0, u1 = math.log(sigma_min), math.log(sigma_max)
    h = (u1 - u0) / steps
    z, integral = x.detach().clone(), torch.zeros(n, dtype=x.dtype, device=x.device)
    for i in range(steps):
        u = u0 + i * h
        k1, d1 = field(z, u)
        k2, d2 = field(z + 0.5 * h * k1, u + 0.5 * h)
        k3, d3 = field(z + 0.5 * h * k2, u + 0.5 * h)
        k4, d4 = field(z + h * k3, u + h)
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        integral = integral + h / 6 * (d1 + 2 * d2 + 2 * d3 + d4)
    flat = z.reshape(n, -1)
    log_prior = -0.5 * (flat ** 2).sum(1) / sigma_max ** 2 - dim * (math.log(sigma_max) + 0.5 * math.log(2 * math.pi))
    return -(log_prior + integral)


def dequantized_bits_per_dim(nll_nats: Tensor, dim: int, bin_width: float) -> Tensor:
    """Upper bound on the discrete NLL in bits/dim from the continuous NLL of uniformly dequantized
    data x + bin_width (u - 1/2), u ~ U(0, 1)^D (Theis et al. 2016):
        -log P(bin) <= E_u[-log p(x + ...)] - D log(bin_width),
    e.g. bin_width = 2/255 for 8-bit images scaled to [-1, 1]."""
    return (nll_nats - dim * math.log(bin_width)) / (dim * math.log(2))


# -- a run, end to end: `diffspace eval RUN` -------------------------------------------------------------
def evaluate_run(run: str, n: int = 2000, sampler: str = "", nfe: int = 0, seed: int = 0,
                 nll_samples: int = 256, nll_steps: int = 32) -> dict:
    """Sample n points from a run's EMA model and measure them against fresh data, every figure
    next to its noise floor (the same measure between two independent real sets of the same size):

    * points: sliced W2 and energy distance; for the analytic mixtures also KL(model || data),
      estimated as E_model[-log p_data] - H(p_data) with the entropy H from real samples;
    * digits: the classifier's confident share, class coverage and Inception-Score-style figure;
    * likelihood: NLL of held-out data through the probability-flow ODE, in nats/dim
      (points) or dequantized bits/dim (digits: 17 grey levels, bin width 1/8)."""
    from .analytic import MIXTURES
    from .data import MIXTURE_SPECS, load
    from .train import load_model, sample

    model, cfg, info = load_model(run)
    shape = tuple(info["shape"])
    x = sample(model, n, shape, torch.Generator().manual_seed(seed), sampler, nfe)
    spec = cfg.data.spec
    data = load(spec, n=cfg.data.n or None, size=cfg.data.size or None, channels=cfg.data.channels or None,
                seed=cfg.train.seed)
    _, test = data.split(cfg.data.test_fraction, seed=cfg.train.seed)
    rows: list[tuple[str, float, float | None]] = []  # (measure, value, noise floor)
    if len(shape) == 1:
        fresh = lambda k, s: load(spec, n=k, seed=1_000 + s).x
        a, b = fresh(n, 1), fresh(n, 2)
        rows.append(("sliced W2", sliced_wasserstein(x, a), sliced_wasserstein(b, a)))
        rows.append(("energy distance", energy_distance(x, a), energy_distance(b, a)))
        if spec in MIXTURE_SPECS:
            mixture = MIXTURES[MIXTURE_SPECS[spec]]()
            entropy = float(-mixture.log_prob(a.double()).mean())
            rows.append(("KL(model || data), nats", float(-mixture.log_prob(x.double()).mean()) - entropy,
                         float(-mixture.log_prob(b.double()).mean()) - entropy))
    elif spec == "digits":
        clf = DigitsClassifier(seed=0)
        real = load("digits").x
        r, r_real = clf.report(x), clf.report(real)
        rows += [("confident share (p >= 0.8)", r["confident"], r_real["confident"]),
                 ("smallest class share", r["min_class_fraction"], r_real["min_class_fraction"]),
                 ("classifier score (max 10)", r["classifier_score"], r_real["classifier_score"])]
    held_out = test.x[:nll_samples].double()
    dim = held_out[0].numel()
    denoiser = lambda z, s: model(z.float(), s.float()).double()
    if spec == "digits":  # uniform dequantization over each grey level's bin
        u = torch.rand(held_out.shape, generator=torch.Generator().manual_seed(seed), dtype=held_out.dtype)
        nll = pf_ode_nll(denoiser, held_out + (u - 0.5) / 8, steps=nll_steps)
        rows.append(("test NLL, bits/dim (PF-ODE, dequantized)", float(dequantized_bits_per_dim(nll, dim, 1 / 8).mean()), None))
    else:
        nll = pf_ode_nll(denoiser, held_out, steps=nll_steps)
        rows.append(("test NLL, nats/dim (PF-ODE)", float(nll.mean()) / dim, None))
    return {"run": str(run), "spec": spec, "n": n, "sampler": sampler or model.preset.solver, "nfe": nfe, "rows": rows}


def markdown(result: dict) -> str:
    """The result of evaluate_run as a Markdown table (measure | value | noise floor)."""
    lines = [f"Evaluation of `{result['run']}` ({result['spec']}, n = {result['n']}, sampler "
             f"`{result['sampler']}`, NFE {result['nfe'] or 'default'})", "",
             "| measure | model | noise floor (real vs real) |", "| --- | ---: | ---: |"]
    for name, value, floor in result["rows"]:
        lines.append(f"| {name} | {value:.4g} | {'-' if floor is None else f'{floor:.4g}'} |")
    return "\n".join(lines) + "\n"
