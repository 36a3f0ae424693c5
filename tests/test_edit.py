"""diffspace.edit against independent computations: inpainting (replacement, RePaint) against the exact
conditional law of a Gaussian mixture (GaussianMixture.condition) by sliced W2 next to its noise
floor, and the replacement dynamics of one Gaussian against an independent ODE solve (scipy); the
known values of every output against the input; make_mask against masks built by hand; SDEdit's
start index against exact rational arithmetic and its strength-1 output against the mixture's law;
encode / decode against a closed-form PF-ODE flow and N(0, sigma_max^2 I).

Every sampler runs with the exact mixture denoiser, so what is measured is the method and the
discretisation, never a network. Ratios are SW2(inpainted unknown part, exact conditional samples) /
SW2(two exact conditional sample sets), n = 2000 each. Measured with the seeds below (CPU, float64):

* replacement is far from the conditional law on every mixture and sampler (mix4: 17-23x, image64
  random half: 37-149x, image64 top half: ~300x): the known part of the state is a sample of
  q(x~_K | y) but the unknown part is denoised given the noisy x~_K, not given y, which biases it
  (test_replacement_follows_its_ode shows the code integrates exactly that ODE; its limit law is not
  the conditional one);
* RePaint reaches the 2x bar with enough resampling (jump_n_sample 40-80): the best settings were
  jump_length 1 on the 4-D mixture and jump_length 5 on image64; jump_length 10 (the paper's) was
  3-10x worse at the same cost (test_repaint_settings_sweep). The ratio depends on the known vector:
  with deis_pc on image64 2 of 6 vectors gave ~17x (for 5 x 20, 1.3 % of the samples ended in
  components of conditional weight ~0), and with the top half known instead of a random half no
  setting tried came near (~160-200x). The mix4 ratios (1.6-1.9) are close to the bar: the same output
  measured against single reference / floor pairs ranged 1.3-3.2, hence REPEATS.
* replacement with particles (method 'smc', SMCDiff) tends to the conditional law as the particles grow
  (mix4, 50 steps: 18.4 / 4.2 / 1.9 at 1 / 8 / 32 particles); with 32 particles and 100 steps mix4 1.42
  (y seeds 11, 12: 1.36, 1.18) and image64 1.44 (y seeds 11, 12: 3.84, 1.61); image64 top half 52.5 at
  32 particles, 18.8 at 128. One particle is replacement with DDPM's posterior-variance step (same law).
"""

import functools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from diffspace.analytic import GaussianMixture, image_like64, ring8
from diffspace.edit import MASKS, decode, encode, inpaint, make_mask, sdedit, sdedit_start, systematic_resample
from diffspace.evaluate import noise_floor, sliced_wasserstein
from diffspace.samplers import get_sigmas

F64 = torch.float64
N = 2000  # samples per set for every law comparison
SIGMA_MAX = 80.0


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the mixture denoiser's ops are small, and on two shared cores two threads
    were measured ~50x slower (270 ms vs 5 ms per call at B = 2000, d = 64) from contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- the mixtures and their conditional laws --------------------------------------------------------
def mixture4() -> GaussianMixture:
    """K = 3 full-covariance Gaussians in 4-D, overlapping enough that knowing 2 coordinates leaves
    2 components with sizeable weight (0.38 / 0.62 for the known vector of seed 7)."""
    g = gen(0)
    means = torch.randn(3, 4, generator=g, dtype=F64)
    A = 0.5 * torch.randn(3, 4, 4, generator=g, dtype=F64)
    return GaussianMixture(torch.tensor([0.3, 0.3, 0.4], dtype=F64), means, A @ A.mT + 0.05 * torch.eye(4, dtype=F64))


def random_half(d: int = 64, seed: int = 0) -> torch.Tensor:
    m = torch.zeros(d, dtype=torch.bool)
    m[torch.randperm(d, generator=gen(seed))[: d // 2]] = True
    return m


def setting(name: str):
    """(mixture, known mask (d,))."""
    if name == "mix4":
        return mixture4(), torch.tensor([True, False, True, False])
    if name == "image64":  # known: a random half of the 64 pixels
        return image_like64(K=8), random_half()
    if name == "image64_top":  # known: the first 32 coordinates = the top half of the 8 x 8 image
        return image_like64(K=8), make_mask("top", (1, 8, 8)).reshape(64)
    raise KeyError(name)


REPEATS = 4  # reference sets and floor pairs averaged: one pair alone moved a ratio of ~2 by +-50 %


@functools.lru_cache(maxsize=None)
def case(name: str, y_seed: int = 7):
    """The mixture, its mask, one known vector y_K (an exact sample), the exact conditional law,
    REPEATS sets of n exact samples of it and the noise floor: SW2 between two more independent exact
    sets of n, averaged over REPEATS pairs."""
    gm, mask = setting(name)
    y_known = gm.sample(1, gen(y_seed))[0]
    cond = gm.condition(mask, y_known)
    references = [cond.sample(N, gen(303 + i)) for i in range(REPEATS)]
    floor = sum(noise_floor(cond.sample, N, seed=i) for i in range(REPEATS)) / REPEATS
    return gm, mask, y_known, cond, references, floor


@functools.lru_cache(maxsize=None)
def ratio(name: str, sampler: str, steps: int, method: str, y_seed: int = 7, **options) -> float:
    """SW2(inpainted unknown coordinates, exact conditional samples) / noise floor, the SW2 averaged
    over the REPEATS reference sets; n samples all sharing the known vector, EDM grid of `steps`
    steps, exact mixture denoiser."""
    gm, mask, y_known, cond, references, floor = case(name, y_seed)
    y = y_known.expand(N, -1).clone()
    x = inpaint(gm, y, mask, get_sigmas("edm", steps), sampler, method=method, generator=gen(3), **options)
    assert torch.equal(x[:, mask], y[:, mask])
    r = sum(sliced_wasserstein(x[:, ~mask], ref) for ref in references) / len(references) / floor
    print(f"{name} y{y_seed} {sampler} N={steps} {method} {options}: SW2 / floor = {r:.2f}")
    return r


# (setting, sampler, steps, sampler options, RePaint settings) at y_seed 7
SAMPLER_SETTINGS = {
    ("mix4", "heun"): (20, {}, dict(jump_length=1, jump_n_sample=80)),
    ("mix4", "ddpm"): (50, {}, dict(jump_length=1, jump_n_sample=40)),
    # edm_sde's gamma = min(S_churn / steps, sqrt 2 - 1) sees RePaint's segment length as `steps` (see test 6);
    # here both 20 / 25 and 20 / 1 are capped at sqrt 2 - 1, so replacement and RePaint churn alike
    ("mix4", "edm_sde"): (25, dict(S_churn=20), dict(jump_length=1, jump_n_sample=40)),
    ("image64", "deis_pc"): (40, {}, dict(jump_length=5, jump_n_sample=40)),
    ("image64", "ddpm"): (50, {}, dict(jump_length=5, jump_n_sample=40)),
}
# replacement on the same grids, measured SW2 / floor (y_seed 7): none meets the 2x bar
REPLACE_MEASURED = {("mix4", "heun"): 22, ("mix4", "ddpm"): 19, ("mix4", "edm_sde"): 18,
                    ("image64", "deis_pc"): 151, ("image64", "ddpm"): 65}


# -- 1. inpainting against the exact conditional law --------------------------------------------------
def settings(*marks):
    """SAMPLER_SETTINGS' keys as parameters with `marks`; the 64-D cases (80 s in all) are slow."""
    return [pytest.param(k, id="-".join(k), marks=[*marks, *([pytest.mark.slow] if k[0] == "image64" else [])])
            for k in SAMPLER_SETTINGS]


@pytest.mark.parametrize("key", settings())
def test_repaint_matches_the_exact_conditional_law(key):
    name, sampler = key
    steps, options, jumps = SAMPLER_SETTINGS[key]
    r = ratio(name, sampler, steps, "repaint", **options, **jumps)
    assert r < 2.0


@pytest.mark.parametrize("key", [pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.xfail(
    strict=True, reason=f"replacement is biased: measured SW2 / floor ~ {REPLACE_MEASURED[p.values[0]]} (bar 2)")])
    for p in settings()])
def test_replacement_matches_the_exact_conditional_law(key):
    name, sampler = key
    steps, options, _ = SAMPLER_SETTINGS[key]
    assert ratio(name, sampler, steps, "replace", **options) < 2.0


@pytest.mark.parametrize("key", settings())
def test_repaint_is_closer_than_replacement(key):
    name, sampler = key
    steps, options, jumps = SAMPLER_SETTINGS[key]
    replace = ratio(name, sampler, steps, "replace", **options)
    repaint = ratio(name, sampler, steps, "repaint", **options, **jumps)
    assert repaint < replace / 5


def test_replacement_follows_its_ode_for_a_gaussian():
    """For one Gaussian N(mu, C) the replacement ODE is linear: x_K = y + sigma e_K, and
    dx_U / dlog(sigma) = x_U - [mu + C (C + sigma^2 I)^-1 (x - mu)]_U, from x_U = sigma_max e_U with e
    the inpainting generator's first draw. scipy's DOP853 (rtol 1e-11) down to sigma_min, then the
    denoising step, is the limit of heun's output: heun must converge to it at second order. The
    limit law, N(c, M M^T) for the affine map x_U = c + M e, is not the conditional one: replacement's
    failure in the mixture tests is the method's, not the code's."""
    from scipy.integrate import solve_ivp

    g = gen(0)
    A = 0.5 * torch.randn(4, 4, generator=g, dtype=F64)
    mu = torch.randn(4, generator=g, dtype=F64)
    C = A @ A.mT + 0.05 * torch.eye(4, dtype=F64)
    gm = GaussianMixture(torch.ones(1), mu[None], C[None])
    mask = torch.tensor([True, False, True, False])
    y_known = gm.sample(1, gen(7))[0]
    n, sigma_min = 50, 0.002
    y = y_known.expand(n, -1).clone()
    e = torch.randn(y.shape, generator=gen(3), dtype=F64).numpy()
    Cn, mun, K, U, yn = C.numpy(), mu.numpy(), mask.numpy(), ~mask.numpy(), y_known.numpy()

    def solve(eps):  # eps (m, 4) -> x_U at sigma = 0 (m, 2)
        m = len(eps)

        def full(u, xU):
            s = math.exp(u)
            x = np.empty((m, 4))
            x[:, K], x[:, U] = yn[K] + s * eps[:, K], xU.reshape(m, -1)
            return x, s

        def rhs(u, z):
            x, s = full(u, z)
            D = mun + (x - mun) @ (Cn @ np.linalg.inv(Cn + s * s * np.eye(4))).T
            return (x[:, U] - D[:, U]).ravel()

        sol = solve_ivp(rhs, (math.log(SIGMA_MAX), math.log(sigma_min)), (SIGMA_MAX * eps[:, U]).ravel(),
                        method="DOP853", rtol=1e-11, atol=1e-12)
        x, s = full(math.log(sigma_min), sol.y[:, -1])
        return (mun + (x - mun) @ (Cn @ np.linalg.inv(Cn + s * s * np.eye(4))).T)[:, U]

    exact = solve(e)
    errors = []
    for steps in (100, 200):
        x = inpaint(gm, y, mask, get_sigmas("edm", steps), "heun", generator=gen(3))
        errors.append(float(np.abs(x[:, ~mask].numpy() - exact).max()))
    print("heun replacement vs ODE, max error at 100 / 200 steps:", errors)
    assert errors[1] < 2e-3 and errors[0] / errors[1] > 3

    # the limit law of replacement vs the exact conditional law
    basis = solve(np.vstack([np.zeros((1, 4)), np.eye(4)]))
    c, M = basis[0], (basis[1:] - basis[0]).T
    cond = gm.condition(mask, y_known)
    mean_gap = float(np.linalg.norm(c - cond.means[0].numpy()))
    cond_std = float(cond.covs[0].diagonal().sqrt().min())
    print(f"replacement limit mean {c}, cov {(M @ M.T).ravel()}; conditional mean {cond.means[0].numpy()}, "
          f"cov {cond.covs[0].numpy().ravel()}")
    assert mean_gap > cond_std  # biased by more than a conditional standard deviation


# -- 2. the known values are the input's, exactly --------------------------------------------------------
@pytest.mark.parametrize("method", ["replace", "repaint"])
@pytest.mark.parametrize("sampler, options", [("heun", {}), ("deis_pc", {}), ("ddpm", {}), ("edm_sde", dict(S_churn=10)),
                                              ("euler_maruyama", {}), ("dpmpp_2m", {})])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_known_values_are_the_input_exactly(method, sampler, options, dtype):
    gm = mixture4()
    n = 64
    y = gm.sample(n, gen(1)).to(dtype)  # a different known vector per sample
    mask = torch.rand(n, 4, generator=gen(2)) < 0.5  # and a different mask per sample
    x = inpaint(gm, y, mask, get_sigmas("edm", 12), sampler, method=method, jump_length=4, jump_n_sample=3,
                generator=gen(4), **options)
    assert x.dtype == dtype and x.shape == y.shape and torch.isfinite(x).all()
    assert torch.equal(x[mask], y[mask])
    assert not torch.equal(x[~mask], y[~mask])


@pytest.mark.parametrize("spec", MASKS)
def test_known_values_exact_on_images_with_named_masks(spec):
    gm = image_like64(K=8)

    def denoiser(x, sigma):  # images (B, 1, 8, 8) through the flat 64-D mixture
        return gm(x.reshape(len(x), 64), sigma).reshape(x.shape)

    y = gm.sample(16, gen(5)).reshape(16, 1, 8, 8)
    mask = make_mask(spec, (1, 8, 8))
    for method in ("replace", "repaint"):
        x = inpaint(denoiser, y, mask, get_sigmas("edm", 10), "ddpm", method=method, jump_length=5, jump_n_sample=2,
                    generator=gen(6))
        m = mask.expand_as(y)
        assert torch.equal(x[m], y[m]) and not torch.equal(x[~m], y[~m])


def test_inpaint_errors():
    gm, mask = setting("mix4")
    y, sigmas = gm.sample(4, gen(0)), get_sigmas("edm", 5)
    with pytest.raises(ValueError, match="method"):
        inpaint(gm, y, mask, sigmas, method="blend")
    with pytest.raises(ValueError, match="jump_length"):
        inpaint(gm, y, mask, sigmas, method="repaint", jump_length=0)
    with pytest.raises(ValueError, match="jump_n_sample"):
        inpaint(gm, y, mask, sigmas, method="repaint", jump_n_sample=0)


# -- 3. make_mask ---------------------------------------------------------------------------------------
def mask_by_hand(spec, c, h, w):
    """The named known region, pixel by pixel."""
    inside = {"left": lambda i, j: j < w / 2, "right": lambda i, j: j >= w / 2, "top": lambda i, j: i < h / 2,
              "bottom": lambda i, j: i >= h / 2,
              "center": lambda i, j: h / 4 <= i < 3 * h / 4 and w / 4 <= j < 3 * w / 4}[spec]
    return torch.tensor([[[inside(i, j) for j in range(w)] for i in range(h)]] * c)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8), (1, 16, 16), (2, 4, 12)])
@pytest.mark.parametrize("spec", MASKS)
def test_named_masks_on_images(spec, shape):
    m = make_mask(spec, shape)
    c, h, w = shape
    expected = mask_by_hand(spec, c, h, w)
    assert m.dtype == torch.bool and m.shape == shape
    assert torch.equal(m, expected)
    assert int(m.sum()) == (c * h * w // 4 if spec == "center" else c * h * w // 2)


def test_named_masks_on_one_8x8_image_explicitly():
    m = {spec: make_mask(spec, (1, 8, 8))[0] for spec in MASKS}
    assert m["left"][:, :4].all() and not m["left"][:, 4:].any()
    assert m["right"][:, 4:].all() and not m["right"][:, :4].any()
    assert m["top"][:4].all() and not m["top"][4:].any()
    assert m["bottom"][4:].all() and not m["bottom"][:4].any()
    assert m["center"][2:6, 2:6].all() and int(m["center"].sum()) == 16
    assert torch.equal(m["left"] ^ m["right"], torch.ones(8, 8, dtype=torch.bool))
    assert torch.equal(m["top"] ^ m["bottom"], torch.ones(8, 8, dtype=torch.bool))


@pytest.mark.parametrize("d", [2, 6, 7])
def test_named_masks_on_points(d):
    left, right = make_mask("left", (d,)), make_mask("right", (d,))
    assert left.shape == (d,) and left.dtype == torch.bool
    assert left.tolist() == [i < d // 2 for i in range(d)]
    assert torch.equal(right, ~left)


def test_make_mask_errors(tmp_path):
    for bad in ("middle", "Left", "", "top-left"):
        with pytest.raises(ValueError, match="allowed"):
            make_mask(bad, (1, 8, 8))
    for spec in ("top", "bottom", "center"):
        with pytest.raises(ValueError, match="points"):
            make_mask(spec, (6,))
    with pytest.raises(ValueError, match="named masks"):
        make_mask("left", (8, 8))
    with pytest.raises(ValueError):
        make_mask(str(tmp_path / "missing.npy"), (1, 8, 8))
    text = tmp_path / "mask.txt"
    text.write_text("1 0")
    with pytest.raises(ValueError):
        make_mask(str(text), (2,))
    for name, array in [("shape77", np.ones((7, 7))), ("shape288", np.ones((2, 8, 8))), ("shape9", np.ones((1, 8, 9)))]:
        np.save(tmp_path / f"{name}.npy", array)
        with pytest.raises(ValueError, match="shape"):
            make_mask(str(tmp_path / f"{name}.npy"), (1, 8, 8))
    for name, value in [("two", 2.0), ("half", 0.5), ("minus", -1.0), ("nan", float("nan"))]:
        array = np.zeros((8, 8))
        array[3, 4] = value
        np.save(tmp_path / f"{name}.npy", array)
        with pytest.raises(ValueError, match="0/1"):
            make_mask(str(tmp_path / f"{name}.npy"), (1, 8, 8))
    np.savez(tmp_path / "two_arrays.npz", a=np.ones((8, 8)), b=np.zeros((8, 8)))
    with pytest.raises(ValueError, match="'mask'"):
        make_mask(str(tmp_path / "two_arrays.npz"), (1, 8, 8))


def test_make_mask_files(tmp_path):
    pattern = (np.arange(64).reshape(8, 8) % 3 == 0)
    # (H, W) of 0/1 ints, broadcast to every channel
    np.save(tmp_path / "hw.npy", pattern.astype(np.int64))
    m = make_mask(str(tmp_path / "hw.npy"), (3, 8, 8))
    assert m.dtype == torch.bool and m.shape == (3, 8, 8)
    for c in range(3):
        assert torch.equal(m[c], torch.from_numpy(pattern))
    m[0, 0, 0] = not bool(m[0, 0, 0])  # an independent tensor, not a broadcast view
    assert bool(m[1, 0, 0]) == bool(pattern[0, 0])
    # .npz with a key 'mask' beside others; a bool (C, H, W) array
    full = np.stack([pattern, ~pattern, pattern])
    np.savez(tmp_path / "m.npz", other=np.zeros(3), mask=full)
    assert torch.equal(make_mask(str(tmp_path / "m.npz"), (3, 8, 8)), torch.from_numpy(full))
    # .npz with one array of another name; float 0/1 values; (d,) points
    np.savez(tmp_path / "single.npz", known=np.array([1.0, 0.0, 0.0, 1.0]))
    assert make_mask(str(tmp_path / "single.npz"), (4,)).tolist() == [True, False, False, True]
    # the uppercase suffix is accepted too
    np.save(tmp_path / "upper.npy", pattern)
    (tmp_path / "upper.npy").rename(tmp_path / "UPPER.NPY")
    assert torch.equal(make_mask(str(tmp_path / "UPPER.NPY"), (1, 8, 8))[0], torch.from_numpy(pattern))


# -- 4. SDEdit ------------------------------------------------------------------------------------------
def steps_left_exact(strength: str, n: int) -> int:
    """ceil(S N) in exact rational arithmetic, at least 1."""
    return max(1, math.ceil(Fraction(strength) * n))


@pytest.mark.parametrize("n", [1, 2, 10, 18, 40, 100])
@pytest.mark.parametrize("strength", ["1", "0.9", "0.75", "0.5", "0.3", "0.25", "0.1", "0.01", "0.000001"])
def test_sdedit_start_leaves_the_last_ceil_sn_steps(strength, n):
    sigmas = get_sigmas("edm", n)
    start = sdedit_start(sigmas, float(strength))
    assert len(sigmas[start:]) - 1 == steps_left_exact(strength, n)
    if strength == "1":
        assert start == 0 and float(sigmas[start]) == pytest.approx(SIGMA_MAX)


@pytest.mark.parametrize("strength, n", [("0.28", 25), ("0.14", 50), ("0.07", 100), ("0.55", 100)])
def test_sdedit_start_exact_products(strength, n):
    sigmas = get_sigmas("edm", n)
    assert len(sigmas[sdedit_start(sigmas, float(strength)):]) - 1 == steps_left_exact(strength, n)


@pytest.mark.parametrize("strength", [0.0, 1.5, -0.1, float("nan")])
def test_sdedit_invalid_strengths(strength):
    gm = ring8()
    with pytest.raises(ValueError, match="strength"):
        sdedit_start(get_sigmas("edm", 10), strength)
    with pytest.raises(ValueError, match="strength"):
        sdedit(gm, gm.sample(4, gen(0)), get_sigmas("edm", 10), strength)


def test_sdedit_walks_the_tail_of_the_grid():
    gm, sigmas = ring8(), get_sigmas("edm", 20)
    seen = []
    sdedit(gm, gm.sample(8, gen(0)), sigmas, 0.3, "euler", callback=lambda info: seen.append(info["sigma"]))
    assert seen == sigmas[20 - 6:-1].tolist()  # ceil(0.3 * 20) = 6 steps


def test_sdedit_small_strength_returns_nearly_the_input():
    gm, sigmas = ring8(), get_sigmas("edm", 50)
    y = gm.sample(N, gen(0))
    rmse = {}
    for strength in (0.01, 0.3, 0.6):
        x = sdedit(gm, y, sigmas, strength, "heun", generator=gen(1))
        rmse[strength] = float((x - y).pow(2).mean().sqrt())
    print("SDEdit RMSE(output, input) by strength:", rmse)
    # one Euler step from sigma_min = 0.002: D(y + 0.002 eps) - y is about 0.002 eps per coordinate
    assert rmse[0.01] < 2 * 0.002
    assert rmse[0.01] < rmse[0.3] < rmse[0.6]


@pytest.mark.parametrize("sampler, steps", [("heun", 40), ("ddpm", 100)])
def test_sdedit_strength_one_from_pure_noise_matches_the_mixture(sampler, steps):
    gm = ring8()
    x = sdedit(gm, torch.zeros(N, 2, dtype=F64), get_sigmas("edm", steps), 1.0, sampler, generator=gen(2))
    r = sliced_wasserstein(x, gm.sample(N, gen(303))) / noise_floor(gm.sample, N)
    print(f"SDEdit strength 1 ({sampler}, {steps} steps) on ring8: SW2 / floor = {r:.2f}")
    assert r < 1.5


# -- 5. encode / decode ---------------------------------------------------------------------------------------
def test_encode_matches_the_closed_form_flow_of_a_gaussian():
    """For N(0, v I) the PF-ODE flow is x(sigma) = x(sigma_min) sqrt((v + sigma^2) / (v + sigma_min^2)):
    encode's Heun steps converge to it at second order."""
    v = 0.05**2
    gm = GaussianMixture(torch.ones(1), torch.zeros(1, 2, dtype=F64), torch.full((1, 2), v, dtype=F64))
    x = gm.sample(16, gen(0))
    exact = x * math.sqrt((v + SIGMA_MAX**2) / (v + 0.002**2))
    errors = [float(((encode(gm, x, get_sigmas("edm", n)) - exact) / exact).abs().max()) for n in (20, 40, 80)]
    print("encode of a Gaussian, max relative latent error at 20 / 40 / 80 steps:", errors)
    assert errors[2] < 0.01
    assert all(a / b > 3.5 for a, b in zip(errors, errors[1:]))


def round_trip_errors(gm, steps, n=1000):
    x = gm.sample(n, gen(0))
    out = {}
    for k in steps:
        sigmas = get_sigmas("edm", k)
        e = (decode(gm, encode(gm, x, sigmas), sigmas) - x).pow(2).sum(1).sqrt()  # per sample
        out[k] = (float(e.pow(2).mean().sqrt() / math.sqrt(gm.dim)), float(e.median()))
    return out


@pytest.mark.parametrize("name", ["ring8", "image64"])
def test_round_trip_error_shrinks_with_the_grid(name):
    gm = ring8() if name == "ring8" else image_like64(K=8)
    errors = round_trip_errors(gm, (10, 20, 40))
    rmse, median = [errors[k][0] for k in errors], [errors[k][1] for k in errors]
    print(f"{name} round trip, RMSE per coordinate {rmse}, ratios {[a / b for a, b in zip(rmse, rmse[1:])]}; "
          f"median per-sample error {median}, ratios {[a / b for a, b in zip(median, median[1:])]}")
    assert rmse[2] < 0.01 and median[2] < 0.01
    # at least quadratic per halving of the step (measured ~8-10x for the median: the leading local
    # errors of the upward and downward Heun steps cancel to first order)
    assert all(a / b > 4 for a, b in zip(median, median[1:]))
    assert all(a / b > 3 for a, b in zip(rmse, rmse[1:]))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ring8", "image64"])
def test_round_trip_error_keeps_shrinking_on_finer_grids(name):
    gm = ring8() if name == "ring8" else image_like64(K=8)
    errors = round_trip_errors(gm, (40, 80, 160, 320))
    rmse, median = [errors[k][0] for k in errors], [errors[k][1] for k in errors]
    print(f"{name} round trip at 40-320 steps, RMSE per coordinate {rmse}, median {median}")
    assert all(a / b > 4 for a, b in zip(median, median[1:]))
    assert all(a / b > 2 for a, b in zip(rmse, rmse[1:]))  # the RMSE's tail: samples between components
    assert rmse[-1] < 1e-4


@pytest.mark.parametrize("name", ["ring8", "image64"])
def test_latents_of_data_are_normal_with_std_sigma_max(name):
    """p_sigma_max = p * N(0, sigma_max^2 I) has per-coordinate std sqrt(sigma_max^2 + var) ~ 80.0000x and
    correlations ~ var / sigma_max^2: the encoded exact samples must look like N(0, sigma_max^2 I)."""
    gm = ring8() if name == "ring8" else image_like64(K=8)
    n = 4000
    z = encode(gm, gm.sample(n, gen(0)), get_sigmas("edm", 80)) / SIGMA_MAX
    std = z.std(0)
    corr = torch.corrcoef(z.T) - torch.eye(gm.dim, dtype=F64)
    print(f"{name} latents / sigma_max: std mean {float(std.mean()):.4f} range [{float(std.min()):.4f}, "
          f"{float(std.max()):.4f}], max |mean| {float(z.mean(0).abs().max()):.4f}, max |corr| {float(corr.abs().max()):.3f}")
    assert (std - 1).abs().max() < 0.05  # per coordinate, statistical sd ~0.011
    assert abs(float(std.pow(2).mean().sqrt()) - 1) < 0.02
    assert z.mean(0).abs().max() < 5 / math.sqrt(n)
    assert corr.abs().max() < 6 / math.sqrt(n)


# -- 6. RePaint with jump_n_sample = 1 is replacement -------------------------------------------------------------
@pytest.mark.parametrize("sampler, options", [
    ("heun", {}), ("euler", {}), ("ddpm", {}), ("ddim", dict(eta=0.5)), ("euler_maruyama", {}), ("edm_sde", {}),
    ("dpmpp_2s", {}), ("pc", {}),
    pytest.param("edm_sde", dict(S_churn=10), marks=pytest.mark.xfail(strict=True, reason=(
        "edm_sde's gamma = min(S_churn / N, sqrt 2 - 1) takes N = the segment's steps (jump_length), "
        "not the grid's: RePaint adds jump_length-dependent churn"))),
    pytest.param("deis_pc", {}, marks=pytest.mark.xfail(strict=True, reason=(
        "multistep samplers restart their history (order ramp-up, lower_order_final) at each segment"))),
    pytest.param("dpmpp_2m", {}, marks=pytest.mark.xfail(strict=True, reason="multistep: history restarts per segment")),
])
def test_repaint_with_one_sample_per_segment_is_replacement(sampler, options):
    gm = ring8()
    y, mask, sigmas = gm.sample(300, gen(0)), torch.tensor([True, False]), get_sigmas("edm", 25)
    a = inpaint(gm, y, mask, sigmas, sampler, generator=gen(5), **options)
    b = inpaint(gm, y, mask, sigmas, sampler, method="repaint", jump_length=10, jump_n_sample=1, generator=gen(5), **options)
    assert torch.equal(a, b)


def test_repaint_with_one_segment_and_one_sample_is_replacement_for_every_sampler():
    """jump_length >= N leaves one segment: the whole grid, walked once, exactly as replacement."""
    gm = ring8()
    y, mask, sigmas = gm.sample(300, gen(0)), torch.tensor([True, False]), get_sigmas("edm", 25)
    for sampler, options in [("deis_pc", {}), ("dpmpp_2m", {}), ("unipc", {}), ("ipndm", {}), ("edm_sde", dict(S_churn=10))]:
        a = inpaint(gm, y, mask, sigmas, sampler, generator=gen(5), **options)
        b = inpaint(gm, y, mask, sigmas, sampler, method="repaint", jump_length=25, jump_n_sample=1, generator=gen(5),
                    **options)
        assert torch.equal(a, b), sampler


# -- slow: RePaint settings, other known vectors, the top-half mask --------------------------------------------
SWEEP = [(1, 20), (1, 40), (5, 20), (5, 40), (10, 10), (10, 40)]


@pytest.mark.slow
@pytest.mark.parametrize("name, sampler, steps, options", [
    ("mix4", "heun", 40, {}), ("mix4", "deis_pc", 40, {}), ("mix4", "ddpm", 50, {}), ("mix4", "edm_sde", 50, dict(S_churn=40)),
    ("image64", "heun", 40, {}), ("image64", "deis_pc", 40, {}), ("image64", "ddpm", 50, {}),
    ("image64", "edm_sde", 50, dict(S_churn=40))])
def test_repaint_settings_sweep(name, sampler, steps, options):
    """SW2 / floor for replacement and a grid of (jump_length, jump_n_sample); RePaint's best beats
    replacement by far, and the paper's jump_length = 10 is never the best."""
    replace = ratio(name, sampler, steps, "replace", **options)
    repaint = {jumps: ratio(name, sampler, steps, "repaint", jump_length=jumps[0], jump_n_sample=jumps[1], **options)
               for jumps in SWEEP}
    best = min(repaint, key=repaint.get)
    print(f"{name} {sampler}: replace {replace:.2f}; repaint {({k: round(v, 2) for k, v in repaint.items()})}; best {best}")
    assert repaint[best] < replace / 5
    assert best[0] != 10


# known vectors other than seed 7: (setting, sampler, steps, options, y_seed) -> measured SW2 / floor when over 2
ROBUST = {("mix4", "ddpm", 50, (("jump_length", 1), ("jump_n_sample", 40))): {},
          ("image64", "ddpm", 50, (("jump_length", 5), ("jump_n_sample", 40))): {},
          ("image64", "deis_pc", 40, (("jump_length", 5), ("jump_n_sample", 40))): {13: 17, 15: 17}}


@pytest.mark.slow
@pytest.mark.parametrize("key, y_seed", [
    pytest.param(key, y_seed, id=f"{key[0]}-{key[1]}-y{y_seed}", marks=[pytest.mark.xfail(
        strict=True, reason=f"measured SW2 / floor ~ {ROBUST[key][y_seed]}: a few samples end in components "
                            "that the conditional law excludes")] if y_seed in ROBUST[key] else [])
    for key in ROBUST for y_seed in (11, 12, 13, 14, 15)])
def test_repaint_on_other_known_vectors(key, y_seed):
    name, sampler, steps, jumps = key
    assert ratio(name, sampler, steps, "repaint", y_seed=y_seed, **dict(jumps)) < 2.0


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="top half known, bottom half extrapolated: measured SW2 / floor ~ 160 "
                   "(RePaint ddpm, 5 x 40), ~ 200 (RePaint deis_pc, 5 x 40); replacement (heun) ~ 318")
@pytest.mark.parametrize("sampler, steps", [("ddpm", 50), ("deis_pc", 40)])
def test_repaint_with_the_top_half_known(sampler, steps):
    assert ratio("image64_top", sampler, steps, "repaint", jump_length=5, jump_n_sample=40) < 2.0


# -- 7. SMC-corrected replacement (SMCDiff) ---------------------------------------------------------------------
@pytest.mark.parametrize("name, steps", [("mix4", 100), pytest.param("image64", 100, marks=pytest.mark.slow)])
def test_smc_matches_the_exact_conditional_law(name, steps):
    """Measured SW2 / floor with 32 particles, 100 steps (y_seed 7): mix4 1.42, image64 (random half) 1.44;
    plain replacement on the same grids 18-65 (REPLACE_MEASURED)."""
    assert ratio(name, "ddpm", steps, "smc", particles=32) < 2.0


def test_smc_tends_to_the_conditional_law_as_the_particles_grow():
    """mix4, 50 steps, measured SW2 / floor: 18.4 / 4.2 / 1.9 with 1 / 8 / 32 particles."""
    r = [ratio("mix4", "ddpm", 50, "smc", particles=k) for k in (1, 8, 32)]
    assert r[0] > 10 and r[1] < r[0] / 2 and r[2] < r[1] / 1.5 and r[2] < 2.0, r


def test_smc_with_one_particle_is_replacement_in_law():
    """One particle: no weights, the known part a forward path, the unknown part DDPM's posterior-variance step
    on the model's D, which is replacement under ddpm(variance='beta_tilde') (known part bridged by the
    same step). Same law, so the same SW2 against the same references up to Monte Carlo: measured 18.37 vs 18.51."""
    one = ratio("mix4", "ddpm", 50, "smc", particles=1)
    replace = ratio("mix4", "ddpm", 50, "replace", variance="beta_tilde")
    assert abs(one / replace - 1) < 0.1, (one, replace)


@pytest.mark.parametrize("seed", range(5))
def test_systematic_resampling_keeps_each_particle_floor_or_ceil_of_p_w_times(seed):
    g = gen(seed)
    w = torch.softmax(3 * torch.randn(6, 50, generator=g, dtype=F64), -1)
    counts = torch.zeros_like(w).scatter_add_(1, systematic_resample(w, g), torch.ones_like(w))
    assert torch.all(counts >= torch.floor(50 * w) - 1e-9) and torch.all(counts <= torch.ceil(50 * w) + 1e-9)


def test_systematic_resampling_is_unbiased():
    """E[count_j] = P w_j over the uniform u (Monte Carlo, 20000 draws; the count is one of two values, so its
    standard deviation is at most 1/2 and the mean's at most 0.0036)."""
    w = torch.tensor([[0.05, 0.5, 0.13, 0.3, 0.02]], dtype=F64).expand(20000, -1)
    counts = torch.zeros_like(w).scatter_add_(1, systematic_resample(w, gen(0)), torch.ones_like(w))
    assert torch.allclose(counts.mean(0), 5 * w[0], atol=0.015)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_smc_keeps_the_known_values_and_takes_its_own_step_only(dtype):
    gm = mixture4()
    y, mask = gm.sample(32, gen(1)).to(dtype), torch.tensor([True, False, False, True])
    seen = []
    x = inpaint(gm, y, mask, get_sigmas("edm", 12).to(dtype), "ddpm", method="smc", particles=4, generator=gen(2),
                callback=seen.append)
    assert x.dtype == dtype and torch.equal(x[:, mask], y[:, mask]) and torch.isfinite(x).all()
    assert [info["ess"] is None for info in seen] == [False] * 11 + [True]
    assert all(bool(((info["ess"] >= 1 - 1e-4) & (info["ess"] <= 4 + 1e-4)).all()) for info in seen[:-1])
    for bad, words in [(dict(sampler="heun"), "sampler='heun'"), (dict(variance="beta"), "options"),
                       (dict(reconstruction=1.0), "reconstruction"), (dict(particles=0), "particles=0"),
                       (dict(ess_threshold=2.0), "ess_threshold")]:
        with pytest.raises(ValueError, match=words):
            inpaint(gm, y, mask, get_sigmas("edm", 4).to(dtype), **{"sampler": "ddpm", **bad}, method="smc")


def test_edits_on_a_grid_that_starts_at_infinity():
    """A zero-terminal-SNR grid (sigma_max = inf: the state there is the unit noise, samplers.initial_state):
    SMC matches the conditional law (measured SW2 / floor 1.00 with 32 particles), replacement and RePaint
    keep the known values and stay finite (23.3 / 4.3), SDEdit at strength 1 samples the mixture, encode /
    decode use the finite levels."""
    gm, mask, y_known, cond, references, floor = case("mix4")
    grid = torch.cat([torch.tensor([math.inf], dtype=F64), get_sigmas("edm", 100)])
    y = y_known.expand(N, -1).clone()
    for method, sampler, options in [("smc", "ddpm", dict(particles=32)), ("replace", "heun", {}),
                                     ("repaint", "ddpm", dict(jump_length=1, jump_n_sample=3))]:
        x = inpaint(gm, y, mask, grid, sampler, method=method, generator=gen(3), **options)
        assert torch.isfinite(x).all() and torch.equal(x[:, mask], y[:, mask]), method
        if method == "smc":
            assert sum(sliced_wasserstein(x[:, ~mask], ref) for ref in references) / len(references) < 2 * floor
    x = sdedit(gm, y, grid, 1.0, "heun", generator=gen(4))
    assert sliced_wasserstein(x, gm.sample(N, gen(5))) < 1.5 * noise_floor(gm.sample, N)
    z = encode(gm, y[:8], grid)
    assert torch.isfinite(z).all() and torch.allclose(decode(gm, z, grid), y[:8], atol=1e-2)


# -- reconstruction guidance -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, sampler, steps", [("mix4", "heun", 20), ("mix4", "ddpm", 50), ("image64", "deis_pc", 40)])
def test_reconstruction_guidance_moves_replacement_towards_the_conditional_law(name, sampler, steps):
    """Measured SW2 / floor, replacement -> + reconstruction guidance 2 (sigma_data 1 for mix4, 0.5 image64):
    mix4 heun 23.4 -> 9.2, mix4 ddpm 19.5 -> 4.6, image64 deis_pc 149 -> 16.5 (RePaint gets below 2, at 40-80x the cost)."""
    sigma_data = 1.0 if name == "mix4" else 0.5
    plain = ratio(name, sampler, steps, "replace")
    guided = ratio(name, sampler, steps, "replace", reconstruction=2.0, sigma_data=sigma_data)
    assert guided < 0.5 * plain, (plain, guided)


def test_reconstruction_guidance_keeps_the_known_values_and_checks_its_weight():
    gm = image_like64(K=4)
    y, mask = gm.sample(8, gen(1)), random_half()
    x = inpaint(gm, y, mask, get_sigmas("edm", 8), "heun", reconstruction=1.0, generator=gen(2))
    assert torch.equal(x[:, mask], y[:, mask]) and torch.isfinite(x).all()
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="reconstruction"):
            inpaint(gm, y, mask, get_sigmas("edm", 8), "heun", reconstruction=bad)
