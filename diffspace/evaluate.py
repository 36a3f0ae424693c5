"""Sample-quality measures, always next to their noise floor.

* `sliced_wasserstein`: SW2 between two point clouds (Bonneel et al. 2015), the 2-D and
  low-dimensional workhorse; `noise_floor` is the same distance between two independent true
  sample sets of the same size, the value a perfect model would get.
* `sample_quality`: every measure that fits the data (features.py's for images), beside its floor;
* `pf_ode_nll`, `model_vlb` / `likelihood`: held-out likelihood through the probability-flow ODE and
  the variational bound; `evaluate_run` does all of it for a run folder (`diffspace eval`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import distributed, process
from .parameterization import broadcast
from .samplers import check_tolerances, dormand_prince, get_sigmas
from .schedules import DiscreteVP, on_device, unchecked

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


class ODELikelihood(NamedTuple):
    """`pf_ode_nll`'s result: nll (nats per sample); error, the solver's estimate of its own error in
    nll per sample (nats; None for fixed RK4 steps); nfe, the evaluations of the field (each one
    denoiser call and its divergence)."""

    nll: Tensor
    error: Tensor | None
    nfe: int


def pf_ode_nll(denoiser, x: Tensor, sigma_min: float = 0.002, sigma_max: float = 80.0, steps: int = 0,
               rtol: float = 1e-5, atol: float = 1e-5, exact: bool | None = None,
               generator: torch.Generator | None = None) -> ODELikelihood:
    """Negative log-likelihood (nats per sample) of x under the model's probability-flow ODE
    (Song et al. 2021, 'Score-Based Generative Modeling through SDEs', Appendix D.2).

    In the scale-free form x~ = x + sigma eps, the ODE is dx/dsigma = f = (x - D(x, sigma)) / sigma
    (Karras et al. 2022, eq. 4 with s = 1), and along its solution
        d log p_sigma(x(sigma)) / dsigma = -div f,
    so  log p_{sigma_min}(x) = log N(x(sigma_max); 0, sigma_max^2 I) + int_{sigma_min}^{sigma_max} div f dsigma.
    The augmented ODE of (x, the integral) runs in u = log sigma (dx/du = sigma f = x - D), by
    default with the Dormand-Prince 5(4) pair under error control (samplers.dormand_prince, the
    sampler `adaptive`'s solver) at rtol = atol = 1e-5 over both parts of the state, as score_sde's
    likelihood (scipy's RK45, rtol = atol = 1e-5); steps = K > 0 takes K classical RK4 steps instead.
    On ring8 with its exact denoiser (2 x 128 points, tests/test_likelihood_fidelity.py) the default
    met the exact density within 4.4e-4 nats at every point with 188 NFE; 32 RK4 steps (128 NFE)
    missed by up to 3.0e-2, 64 (256 NFE) by up to 3.4e-3.
    The error estimate is the sum over accepted steps of the embedded pair's local error estimates
    of the integral (|5th- minus 4th-order solution|), per sample, at no extra evaluation: an
    estimate of the global error, not a bound (it leaves out how errors in x propagate into the
    integral, the error of x(sigma_max) in the prior term, x dx / sigma_max^2, and Hutchinson's
    noise). Measured there against a solve at rtol 1e-10: at the default tolerance its mean was
    1.8x the mean solver error and it exceeded the error at 92 % of the points; at rtol 1e-3 and
    1e-4 only at 52-63 %. The divergence is exact for dimension <= 64 (or exact=True), Hutchinson's
    estimator with one Rademacher probe per sample, fixed along the path, above. The result is the
    density of x plus N(0, sigma_min^2) noise, the quantity the ODE defines."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} must be an integer >= 0 (0: the adaptive solver, K: K RK4 steps)")
    n = len(x)
    dim = x[0].numel()
    exact = dim <= 64 if exact is None else exact
    probe = None
    if not exact:
        g = generator if generator is not None else torch.Generator(device=x.device).manual_seed(0)
        probe = torch.randint(0, 2, x.shape, generator=g, device=x.device).to(x.dtype) * 2 - 1

    def field(u: float, y: Tensor) -> Tensor:  # y = (x flattened, the integral): (n, dim + 1)
        s = torch.full((n,), math.exp(u), dtype=y.dtype, device=y.device)
        out, div = _divergence(lambda z: z - denoiser(z, s), y[:, :-1].reshape(x.shape), probe)
        return torch.cat([out.reshape(n, -1), div[:, None]], 1)  # sigma f = x - D; div(sigma f) likewise

    u0, u1 = math.log(sigma_min), math.log(sigma_max)
    y = torch.cat([x.detach().reshape(n, -1), x.new_zeros(n, 1)], 1)
    if steps:
        h = (u1 - u0) / steps
        for i in range(steps):
            u = u0 + i * h
            k1 = field(u, y)
            k2 = field(u + 0.5 * h, y + 0.5 * h * k1)
            k3 = field(u + 0.5 * h, y + 0.5 * h * k2)
            k4 = field(u + h, y + h * k3)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        error, nfe = None, 4 * steps
    else:
        solution = dormand_prince(field, y, u0, u1, rtol=rtol, atol=atol)
        y, error, nfe = solution.y, solution.error[:, -1], solution.nfe
    flat, integral = y[:, :-1], y[:, -1]
    log_prior = -0.5 * (flat ** 2).sum(1) / sigma_max ** 2 - dim * (math.log(sigma_max) + 0.5 * math.log(2 * math.pi))
    return ODELikelihood(-(log_prior + integral), error, nfe)


def dequantized_bits_per_dim(nll_nats: Tensor, dim: int, bin_width: float) -> Tensor:
    """Upper bound on the discrete NLL in bits/dim from the continuous NLL of uniformly dequantized
    data x + bin_width (u - 1/2), u ~ U(0, 1)^D (Theis et al. 2016):
        -log P(bin) <= E_u[-log p(x + ...)] - D log(bin_width),
    e.g. bin_width = 2/255 for 8-bit images scaled to [-1, 1]."""
    return (nll_nats - dim * math.log(bin_width)) / (dim * math.log(2))


# -- likelihood through the variational bound ---------------------------------------------------------
def vlb_chain(model, steps: int = 0) -> DiscreteVP:
    """The DDPM-style chain on which a trained model's bound is computed. A model trained on a
    discrete chain (presets ddpm, iddpm) uses that chain, respaced to `steps` if given (Nichol &
    Dhariwal 2021, sec. 4); any other model the chain whose noise levels sigma~ are its preset's
    sampling grid with `steps` (default 1000) levels (schedules.DiscreteVP.from_sigmas)."""
    chain = model.schedule
    if isinstance(chain, DiscreteVP):
        return chain.respaced(steps) if steps else chain
    preset = model.preset
    sigmas = get_sigmas(preset.time_steps, steps or 1000, **preset.time_step_kwargs)[:-1].flip(0)
    return DiscreteVP.from_sigmas(sigmas, name=f"{preset.name}-grid-{len(sigmas)}")


def model_vlb(denoiser, x: Tensor, chain: DiscreteVP, variance="beta", levels: int = 0,
              generator: torch.Generator | None = None) -> Tensor:
    """The bound L_T + sum_i L_{i-1} + L_0 in nats per sample (Ho et al. 2020, eq. 5) of a model given
    as a denoiser D(x~, sigma~), on a DiscreteVP chain. Its reverse step is the Gaussian

        p(x_{i-1} | x_i) = N(mu~_i(x_i, x0_hat), Sigma_i),  x0_hat = D(x_i / sqrt(abar_i), sqrt(1 / abar_i - 1)),

    mu~ the mean of the posterior q(x_{i-1} | x_i, x_0) at x_0 = x0_hat (eq. 7; the lecture's reduction of
    the KL to a prediction), Sigma a fixed one (process.reverse_variance: "beta", Ho et al.'s code with
    beta~_2 at i = 1, the default; "beta_plain", beta_1 there; "beta_tilde") or a learned one:
    variance = a callable (x~, sigma~) -> (D, v) (train.Diffusion.denoise_with_variance; process.learned_variance).
    L_0 is the discretized decoder over `levels` values (quantized data: a probability) or, levels = 0,
    the Gaussian density of continuous data. Each term is drawn at its own x_i ~ q(x_i | x_0).
    In bits/dim: process.bits_per_dim(result, x)."""
    learned = callable(variance)

    def model_fn(x_t: Tensor, i: Tensor):
        abar = on_device(chain, "alphas_bar", x_t.device)[i]
        x_tilde = torch.where(broadcast(abar, x_t) == 0, x_t, x_t / broadcast(abar.sqrt(), x_t).to(x_t.dtype))  # eps at SNR 0
        sigma = (1 / abar - 1).sqrt().to(x_t.dtype)
        x0_hat, v = variance(x_tilde, sigma) if learned else (denoiser(x_tilde, sigma), None)
        mean = process.ddpm_posterior(x0_hat, x_t, i, chain)[0]
        var = process.learned_variance(v, i, chain) if learned else process.reverse_variance_on(chain, variance, x_t.device)[i - 1]
        return mean, var

    decoder = "discretized" if levels else "gaussian"
    with unchecked():  # the steps i are made here, in 1..T: no value checks, each a host-device sync on a GPU
        return process.vlb(x, model_fn, chain, generator=generator, decoder=decoder, levels=levels or 256)


# -- sample quality beside its noise floor -------------------------------------------------------------
Row = tuple  # (measure, model value, noise floor or None)


def real_sets(data, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Two independent real sets (a, b) of one size for a noise floor: fresh draws of n points for
    generated 2-D data (data.load of the dataset's name with two seeds), else two disjoint random
    halves of the stored data, at most n each (so for the digits at most 898)."""
    from .data import GENERATORS, MIXTURE_SPECS, load

    if data.name in GENERATORS or data.name in MIXTURE_SPECS:
        return load(data.name, n=n, seed=1_001 + seed).x, load(data.name, n=n, seed=1_002 + seed).x
    half = min(n, len(data) // 2)
    if half < 2:
        raise ValueError(f"{data.name!r} holds {len(data)} samples: too few for two real sets")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.x[perm[:half]], data.x[perm[half:2 * half]]


class NonFiniteSamples(ValueError):
    """Samples with NaN or inf in them (a sampler that diverged)."""


def check_finite(x: Tensor, consequence: str) -> None:
    """NonFiniteSamples (naming how many of x, and the consequence) unless every sample is finite."""
    bad = int((~torch.isfinite(x.reshape(len(x), -1))).any(1).sum())
    if bad:
        raise NonFiniteSamples(f"{bad} of {len(x)} samples are not finite (the sampler diverged; check its "
                               f"options, e.g. step sizes); {consequence}")


def sample_quality(x: Tensor, data, *, labels: Tensor | None = None, seed: int = 0, inception: str | None = None,
                   feature_net=None, device="cpu") -> list[Row]:
    """Measures of samples x against the real data, each next to its noise floor, the same measure
    between two independent real sets of the same size (real_sets: a, b): model = m(x, a), floor =
    m(b, a), with x cut to the size of a (a fixed random subset). Lower is better unless the name says 'higher'.

    * always: sliced W2 (in pixel space for images);
    * points: energy distance; for the analytic mixtures KL(model || data) = E_x[-log p(x)] - H(p),
      with H estimated on a;
    * digits: in the digits feature net (features.digits_metrics): FD_digits, precision, recall,
      classifier score, the confident share and the smallest class share;
    * images with `inception` (a local FID Inception weights file): FD_inception (the FID with
      pytorch-fid's file), precision and recall in its features (the Inception net on `device`);
    * with the requested `labels` of conditional samples: `class_quality`."""
    check_finite(x, "no measure of them would mean anything")
    from .analytic import MIXTURES
    from .data import MIXTURE_SPECS

    a, b = real_sets(data, len(x), seed)
    if len(x) < len(a):
        raise ValueError(f"{len(x)} samples are too few: the floor uses real sets of {len(a)}; draw at least that many")
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:len(a)].sort().values
    x_all, x = x, x[keep].detach().cpu().float()  # a random subset: conditional samples come sorted by label
    rows: list[Row] = [("sliced W2", sliced_wasserstein(x, a), sliced_wasserstein(b, a))]
    if data.kind == "points":
        rows.append(("energy distance", energy_distance(x, a), energy_distance(b, a)))
        if data.name in MIXTURE_SPECS:
            mixture = MIXTURES[MIXTURE_SPECS[data.name]]()
            cross = lambda y: float(-mixture.log_prob(y.double()).mean())  # noqa: E731
            rows.append(("KL(model || data), nats", cross(x) - cross(a), cross(b) - cross(a)))
    if data.name == "digits":
        from .features import digits_feature_net, digits_metrics

        net = feature_net if feature_net is not None else digits_feature_net()
        m, f = digits_metrics(x, a, net), digits_metrics(b, a, net)
        names = [("FD_digits", "FD (digits features)"), ("precision", "precision (higher)"),
                 ("recall", "recall (higher)"), ("classifier_score", "classifier score (higher, max 10)"),
                 ("confident", "confident share p >= 0.8 (higher)"), ("min_class_fraction", "smallest class share (higher)")]
        rows += [(label, m[key], f[key]) for key, label in names]
    if inception and data.kind == "images":
        from .features import inception_metrics

        m, f = inception_metrics(x, a, inception, device=device, others=(b,))  # and the floor's: a's features once
        rows += [("FD_inception (FID)", m["FD_inception"], f["FD_inception"]), ("precision, Inception (higher)",
                 m["precision"], f["precision"]), ("recall, Inception (higher)", m["recall"], f["recall"])]
    if labels is not None:
        rows += class_quality(x_all, labels, data, seed=seed, feature_net=feature_net)
    return rows


def judge(data, feature_net=None):
    """The label judge of a labelled data set, x -> predicted class: the digits feature net, or the exact
    posterior argmax_k p(k | x) of an analytic mixture (labels = components); None for other data."""
    from .analytic import MIXTURES
    from .data import MIXTURE_SPECS

    if data.name == "digits":
        from .features import digits_feature_net

        net = feature_net if feature_net is not None else digits_feature_net()
        return lambda x: net.probabilities(x).argmax(1)
    if data.name in MIXTURE_SPECS:
        mixture = MIXTURES[MIXTURE_SPECS[data.name]]()
        return lambda x: mixture.log_posterior(x.double()).argmax(1)
    return None


def class_quality(x: Tensor, labels: Tensor, data, *, seed: int = 0, feature_net=None) -> list[Row]:
    """Measures of class-conditional samples x drawn for `labels`, beside their floors:

    * label agreement: the share of samples the judge (`judge`) puts in the requested class; floor:
      the judge's agreement with the true labels of the real data;
    * per class, the headline distance (FD in the digits features, else sliced W2) between the samples
      of class c and one half of the real class-c data, averaged over the classes asked for; floor:
      the same between the two halves (the samples cut to the half's size, as in sample_quality)."""
    x, labels = x.detach().cpu().float(), labels.cpu()
    rows: list[Row] = []
    predict = judge(data, feature_net)
    if predict is not None:
        rows.append(("label agreement (higher)", float((predict(x).cpu() == labels).double().mean()),
                     float((predict(data.x).cpu() == data.labels).double().mean())))
    if data.labels is None:
        return rows
    if data.name == "digits":
        from .features import digits_feature_net, frechet_distance_of

        net = feature_net if feature_net is not None else digits_feature_net()
        distance, name = lambda u, v: frechet_distance_of(net.features(u), net.features(v)), "FD per class (digits features)"
    else:
        distance, name = sliced_wasserstein, "sliced W2 per class"
    g = torch.Generator().manual_seed(seed)
    model, floor = [], []
    for c in torch.unique(labels).tolist():
        real = data.x[data.labels == c]
        real = real[torch.randperm(len(real), generator=g)]
        half = min(len(real) // 2, int((labels == c).sum()))
        if half < 2:
            continue
        a, b = real[:half], real[half:2 * half]
        model.append(distance(x[labels == c][:half], a))
        floor.append(distance(b, a))
    if model:
        rows.append((f"{name}, mean over {len(model)} classes", sum(model) / len(model), sum(floor) / len(floor)))
    return rows


def ode_sigma_range(model, sigma_min: float = 0.002, sigma_max: float = 80.0) -> tuple[float, float]:
    """The noise levels the probability-flow ODE NLL of a train.Diffusion runs over: [sigma_min,
    sigma_max] within those of its training schedule (sigma~ at the schedule's t_min and t_max),
    where a network that predicts in the schedule's time is defined (VE: 0.02..100, so 0.02..80)."""
    sch = model.schedule
    low, high = (float(sch.sigma_tilde(torch.tensor(t, dtype=torch.float64))) for t in (sch.t_min, sch.t_max))
    return max(sigma_min, low), min(sigma_max, high)


NLL_CHUNK = 256  # held-out samples per likelihood chunk (one batch, its own seeds): the unit shared out across ranks


def likelihood(model, test: Tensor, levels: int, *, vlb_steps=(0,), vlb_variance: str = "beta",
               pf_ode_steps: int | None = None, pf_ode_rtol: float = 1e-5, seed: int = 0, device="cpu") -> list[Row]:
    """Held-out likelihood of a train.Diffusion, per dimension: the variational bound on its chain
    (vlb_chain; 0 = the full chain, K = respaced to K steps) with its own reverse variance (learned,
    else the fixed `vlb_variance`: default "beta" as Ho et al.'s code computes their reported bounds,
    beta~_2 at step 1; "beta_plain" has beta_1 there, the tighter one on continuous data; see
    process.reverse_variance; the row names it) and the probability-flow ODE NLL over
    ode_sigma_range (the row names the range): pf_ode_steps None (default) integrates with
    Dormand-Prince at rtol = atol = pf_ode_rtol and adds rows with the solver's error estimate and
    NFE (pf_ode_nll; the NFE of the costliest chunk); K > 0 takes K RK4 steps; 0 skips it. Quantized
    data (levels > 0): bits/dim of the discrete values, the ODE's through uniform dequantization over
    each level's bin (an upper bound); continuous data: nats/dim of the density.
    The test samples go in chunks of NLL_CHUNK, chunk k with its own seeds (sampling.stream_seed of
    `seed` and of 0 for the ODE's probe; chunk 0's are the seeds themselves): under torchrun rank r
    computes chunks r, r + W, ... and every rank gets all the per-sample values, so the rows do not
    depend on the number of processes (to the bit on the CPU). `device`: the model's, where the chunks run
    (their random numbers drawn there, so the CPU's and a GPU's differ)."""
    if pf_ode_steps is None:
        check_tolerances(pf_ode_rtol, pf_ode_rtol)
    if vlb_steps and not model.learned_variance and vlb_variance not in process.REVERSE_VARIANCES:
        raise ValueError(f"vlb_variance={vlb_variance!r}; allowed: {', '.join(process.REVERSE_VARIANCES)}")
    dim = test[0].numel()
    chains = [vlb_chain(model, steps) for steps in vlb_steps]  # built once: their tables copied to `device` once
    count, rank, world = -(-len(test) // NLL_CHUNK), distributed.rank(), distributed.world_size()
    mine = [_likelihood_chunk(model, test[k * NLL_CHUNK:(k + 1) * NLL_CHUNK].to(device), k, levels, chains,
                              vlb_variance, pf_ode_steps, pf_ode_rtol, seed) for k in range(rank, count, world)]
    columns = len(chains) + (3 if pf_ode_steps != 0 else 0)
    values = torch.cat(distributed.gather_chunks(mine, count, NLL_CHUNK, len(test),
                                                 torch.empty((0, columns), dtype=torch.float64, device=device)))
    values = values.cpu().T.contiguous()
    unit = "bits/dim" if levels else "nats/dim"
    scale = 1 / (dim * math.log(2)) if levels else 1 / dim
    sigma = "learned" if model.learned_variance else vlb_variance
    rows: list[Row] = []
    for j, chain in enumerate(chains):
        rows += _mean_and_standard_error(f"NLL bound (VLB, {chain.T} steps, Sigma {sigma}), {unit}", values[j] * scale)
    if pf_ode_steps != 0:
        low, high = ode_sigma_range(model)
        solver = f"{pf_ode_steps} RK4 steps" if pf_ode_steps else f"Dormand-Prince, rtol = atol = {pf_ode_rtol:g}"
        name = f"NLL (probability-flow ODE, {solver}, sigma {low:g}..{high:g}), {unit}"
        per_dim, error, nfe = values[-3:]
        rows += _mean_and_standard_error(name, per_dim)
        if not pf_ode_steps:
            rows += [(f"{name}: solver error estimate", float(error.mean()) * scale, None),
                     (f"{name}: solver NFE", float(nfe.max()), None)]
    return rows


def _likelihood_chunk(model, test: Tensor, k: int, levels: int, chains, vlb_variance: str,
                      pf_ode_steps: int | None, pf_ode_rtol: float, seed: int) -> Tensor:
    """`likelihood`'s per-sample values of chunk k, (len(test), columns) in float64: the bound in nats
    on each of the chains, then (unless pf_ode_steps = 0) the ODE's NLL per dimension, its error
    estimate in nats (NaN for RK4) and the solver's NFE for the chunk (repeated on each row)."""
    from .sampling import stream_seed

    x = test.double()
    dim = x[0].numel()
    denoiser = lambda z, s: model(z.float(), s.float()).double()  # noqa: E731
    variance = (lambda z, s: tuple(v.double() for v in model.denoise_with_variance(z.float(), s.float()))
                ) if model.learned_variance else vlb_variance
    columns = []
    with torch.no_grad():
        for chain in chains:
            columns.append(model_vlb(denoiser if not model.learned_variance else None, x, chain, variance, levels,
                                     generator=torch.Generator(device=x.device).manual_seed(stream_seed(seed, k))))
    if pf_ode_steps != 0:
        low, high = ode_sigma_range(model)
        if levels:  # uniform dequantization over each level's bin of width 2 / (levels - 1)
            width = 2 / (levels - 1)
            u = torch.rand(x.shape, generator=torch.Generator(device=x.device).manual_seed(stream_seed(seed, k)),
                           dtype=x.dtype, device=x.device)
            x = x + (u - 0.5) * width
        ode = pf_ode_nll(denoiser, x, low, high, steps=pf_ode_steps or 0, rtol=pf_ode_rtol, atol=pf_ode_rtol,
                         generator=torch.Generator(device=x.device).manual_seed(stream_seed(0, k)))
        columns += [dequantized_bits_per_dim(ode.nll, dim, width) if levels else ode.nll / dim,
                    ode.error if ode.error is not None else torch.full_like(ode.nll, math.nan),
                    torch.full_like(ode.nll, ode.nfe)]
    return torch.stack([c.double() for c in columns], 1) if columns else x.new_zeros((len(x), 0))


def _mean_and_standard_error(name: str, per_sample: Tensor) -> list[Row]:
    """The row of a per-sample likelihood's mean and, from two samples on, the row of its standard
    error std / sqrt(n) (the same held-out samples for every model, so differences are paired)."""
    rows: list[Row] = [(name, float(per_sample.mean()), None)]
    if per_sample.numel() > 1:
        rows.append((f"{name}: standard error", float(per_sample.std() / math.sqrt(per_sample.numel())), None))
    return rows


# -- a run, end to end: `diffspace eval RUN` -------------------------------------------------------------
def evaluate_run(run: str, n: int = 2000, sample_cfg=None, nll_samples: int = 256, pf_ode_steps: int | None = None,
                 vlb_steps=(0,), inception: str | None = None, vlb_variance: str = "beta",
                 pf_ode_rtol: float = 1e-5) -> dict:
    """`evaluate_model` of a run folder's (or checkpoint's) EMA model."""
    from .model import load_model

    model, cfg, _ = load_model(run)
    return evaluate_model(model, cfg, str(run), n, sample_cfg, nll_samples, pf_ode_steps, vlb_steps, inception,
                          vlb_variance, pf_ode_rtol)


def evaluate_model(model, cfg, run: str, n: int = 2000, sample_cfg=None, nll_samples: int = 256,
                   pf_ode_steps: int | None = None, vlb_steps=(0,), inception: str | None = None,
                   vlb_variance: str = "beta", pf_ode_rtol: float = 1e-5, device="cpu") -> dict:
    """Sample n from a run's model as sample_cfg says (default: the run's own [sample] section of
    `cfg`) and measure them (sample_quality, each figure beside its noise floor; with class labels
    also class_quality), then the likelihood of nll_samples held-out samples (likelihood: the VLB on
    the chains `vlb_steps`, the probability-flow ODE with pf_ode_steps: None = adaptive, K = K RK4
    steps; 0 / () skips them; vlb_variance and pf_ode_rtol as in `likelihood`). A latent run (data.encoder)
    is measured on its decoded samples; its likelihood would be of the latents, not the pixels, and is
    not reported. `device`: the model's, where sampling, the likelihood and the Inception features run;
    the other measures run on the CPU."""
    from .sampling import sample
    from .train import load_data

    sample_cfg = sample_cfg or cfg.sample
    data, _, test = load_data(cfg)
    latent = model.encoder.latent  # measured in pixels, after decoding; no pixel likelihood of a latent model
    if not latent and tuple(data.x.shape[1:]) != tuple(model.shape):
        raise ValueError(f"data {cfg.data.spec!r} has samples of shape {tuple(data.x.shape[1:])}, the model "
                         f"{tuple(model.shape)}; measure it against data of its shape (data.spec)")
    s = sample(model, n, sample_cfg, device=device)
    nll = likelihood(model, test.x[:nll_samples], data.levels, vlb_steps=vlb_steps, vlb_variance=vlb_variance,
                     pf_ode_steps=pf_ode_steps, pf_ode_rtol=pf_ode_rtol, seed=sample_cfg.seed, device=device) \
        if nll_samples and not latent else []  # under torchrun: its chunks shared out too
    x, labels = s.x.cpu(), None if s.labels is None else s.labels.cpu()  # all n on every rank
    rows = sample_quality(x, data, labels=labels, seed=sample_cfg.seed, inception=inception, device=device) + nll
    if not distributed.is_main():  # every rank measured (the Inception features are shared out); rank 0 reports
        return None
    return {"run": run, "spec": cfg.data.spec, "n": n, "sampling": s.describe(), "sample_cfg": sample_cfg,
            "rows": rows, "model": model, "samples": x, "labels": labels, "data": data}


def markdown(result: dict) -> str:
    """The result of evaluate_run as a Markdown table (measure | value | noise floor)."""
    lines = [f"Evaluation of `{result['run']}` ({result['spec']}, n = {result['n']}, {result['sampling']})", "",
             "| measure | model | noise floor (real vs real) |", "| --- | ---: | ---: |"]
    for name, value, floor in result["rows"]:
        lines.append(f"| {name} | {value:.4g} | {'-' if floor is None else f'{floor:.4g}'} |")
    return "\n".join(lines) + "\n"
