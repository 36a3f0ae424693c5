"""Loss weightings, their conversion, the weighted loss and noise-level distributions, checked
against computations written out here from the papers (never against the module's own outputs)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from diffspace import losses as L
from diffspace import parameterization as P
from diffspace import schedules as S

SCHEDULES = [S.ddpm_linear(), S.VPSDE(), S.Cosine(), S.VE(), S.EDM(), S.SqrtVE(), S.RectifiedFlow()]
VP_SCHEDULES = [S.ddpm_linear(), S.VPSDE(), S.Cosine()]
f64 = torch.float64


def times(schedule, B=8):
    u = torch.linspace(0.05, 0.95, B, dtype=f64)
    if schedule.t_max == math.inf:  # EDM: t = sigma; SqrtVE: t = sigma^2
        return torch.exp(math.log(1e-2) + u * math.log(1e4))
    return u


def draw(schedule, B=8, D=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=f64)
    eps = torch.randn(B, D, generator=g, dtype=f64)
    t = times(schedule, B)
    a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    return x, eps, t, a * x + s * eps


def targets(x, eps, t, schedule):
    """Each parameterization's target from its definition."""
    a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    da, ds = schedule.dalpha(t)[:, None], schedule.dsigma(t)[:, None]
    return {"x0": x, "eps": eps, "score": -eps / s, "energy": eps / s, "v": a * eps - s * x, "flow": da * x + ds * eps}


def mse(a, b):
    return ((a - b) ** 2).mean(dim=1)


# -- convert_weight ---------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_converted_weight_gives_the_same_loss_for_the_same_error(schedule):
    x, eps, t, z = draw(schedule)
    g = torch.Generator().manual_seed(3)
    x0_hat = x + 0.3 * torch.randn(x.shape, generator=g, dtype=f64)
    w_src = torch.rand(t.shape, generator=g, dtype=f64) + 0.5
    true = targets(x, eps, t, schedule)
    preds = {name: P.convert(x0_hat, "x0", name, z, t, schedule) for name in P.PARAMETERIZATIONS}
    for src in P.PARAMETERIZATIONS:
        loss_src = w_src * mse(preds[src], true[src])
        for dst in P.PARAMETERIZATIONS:
            w_dst = L.convert_weight(w_src, src, dst, t, schedule)
            loss_dst = w_dst * mse(preds[dst], true[dst])
            torch.testing.assert_close(loss_dst, loss_src, rtol=1e-10, atol=0, msg=f"{src} -> {dst}")


# The lecture's table (多种参数化方法): ||row - row_hat||^2 = entry * ||col - col_hat||^2 for VP,
# i.e. entry = convert_weight(1, row, col).
LECTURE_TABLE = {
    ("x0", "x0"): lambda a, s: 1.0,
    ("x0", "eps"): lambda a, s: s**2 / a**2,
    ("x0", "v"): lambda a, s: s**2,
    ("eps", "x0"): lambda a, s: a**2 / s**2,
    ("eps", "eps"): lambda a, s: 1.0,
    ("v", "x0"): lambda a, s: s**2 * (a**2 / s**2 + 1) ** 2,
    ("v", "eps"): lambda a, s: a**2 * (s**2 / a**2 + 1) ** 2,
    ("v", "v"): lambda a, s: 1.0,
}


@pytest.mark.parametrize("schedule", VP_SCHEDULES, ids=repr)
def test_lecture_loss_weight_table_for_vp(schedule):
    t = times(schedule)
    a, s = schedule.alpha(t), schedule.sigma(t)
    for (row, col), entry in LECTURE_TABLE.items():
        expected = torch.as_tensor(entry(a, s), dtype=f64).expand_as(t)
        torch.testing.assert_close(L.convert_weight(1.0, row, col, t, schedule), expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("schedule", VP_SCHEDULES, ids=repr)
def test_slide_entry_eps_row_v_column_is_alpha_squared_not_its_inverse(schedule):
    """The slide prints 1/alpha^2; measuring the same error both ways gives alpha^2."""
    x, eps, t, z = draw(schedule)
    v_hat = targets(x, eps, t, schedule)["v"] + 0.1
    a, s = schedule.alpha(t), schedule.sigma(t)
    eps_hat = s[:, None] * z + a[:, None] * v_hat  # the lecture's eps-from-v row (VP)
    ratio = mse(eps_hat, eps) / mse(v_hat, targets(x, eps, t, schedule)["v"])
    torch.testing.assert_close(ratio, a**2, rtol=1e-10, atol=0)
    torch.testing.assert_close(L.convert_weight(1.0, "eps", "v", t, schedule), a**2, rtol=1e-10, atol=0)
    assert not torch.allclose(ratio, a**-2)


@settings(max_examples=100, deadline=None)
@given(
    k=st.integers(0, len(SCHEDULES) - 1),
    u=st.floats(0.02, 0.98),
    w=st.floats(1e-3, 1e3),
    src=st.sampled_from(P.PARAMETERIZATIONS),
    dst=st.sampled_from(P.PARAMETERIZATIONS),
)
def test_convert_weight_round_trips(k, u, w, src, dst):
    schedule = SCHEDULES[k]
    t = torch.tensor([math.exp(math.log(1e-2) + u * math.log(1e4)) if schedule.t_max == math.inf else u], dtype=f64)
    there = L.convert_weight(torch.tensor([w], dtype=f64), src, dst, t, schedule)
    back = L.convert_weight(there, dst, src, t, schedule)
    assert math.isclose(back.item(), w, rel_tol=1e-10)


# -- weightings -------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_L_simple_is_the_snr_weighted_x0_loss(schedule):
    x, eps, t, z = draw(schedule)
    eps_hat = eps + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=f64)
    a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    x0_hat = (z - s * eps_hat) / a
    snr = (a**2 / s**2).squeeze(1)
    simple = L.diffusion_loss(eps_hat, x, eps, t, schedule, "eps", L.weighting("constant", t, schedule))
    torch.testing.assert_close(simple, mse(eps_hat, eps), rtol=1e-12, atol=0)
    for name in ("snr", "inverse-sigma2"):
        w = L.weighting(name, t, schedule)
        torch.testing.assert_close(w, snr, rtol=1e-10, atol=0)
        torch.testing.assert_close(L.diffusion_loss(x0_hat, x, eps, t, schedule, "x0", w), simple, rtol=1e-10, atol=0)


@pytest.mark.parametrize("schedule", [S.EDM(), S.EDM(sigma_data=1.3), S.VPSDE()], ids=repr)
def test_edm_lambda_on_D_is_unit_weight_on_F(schedule):
    """Karras et al. 2022, eq. 8: lambda ||D - x||^2 = lambda c_out^2 ||F - F_target||^2, lambda c_out^2 = 1."""
    x, eps, t, z = draw(schedule)
    sd = getattr(schedule, "sigma_data", 0.5)
    sigma = (schedule.sigma(t) / schedule.alpha(t))[:, None]
    x_tilde = z / schedule.alpha(t)[:, None]
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
    F = torch.randn(x.shape, generator=torch.Generator().manual_seed(9), dtype=f64)
    D = c_skip * x_tilde + c_out * F
    F_target = (x - c_skip * x_tilde) / c_out
    lam = L.weighting("edm", t, schedule)
    torch.testing.assert_close(lam, ((sigma**2 + sd**2) / (sigma * sd) ** 2).squeeze(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(L.diffusion_loss(D, x, eps, t, schedule, "x0", lam), mse(F, F_target), rtol=1e-10, atol=0)


@pytest.mark.parametrize("gamma", [0.5, 5.0, 20.0])
@pytest.mark.parametrize("schedule", VP_SCHEDULES, ids=repr)
def test_min_snr_in_eps_and_v_space(schedule, gamma):
    t = times(schedule, 16)
    snr = schedule.alpha(t) ** 2 / schedule.sigma(t) ** 2
    m = torch.minimum(snr, torch.tensor(gamma, dtype=f64))
    torch.testing.assert_close(L.weighting("min-snr", t, schedule, gamma=gamma), m, rtol=1e-12, atol=0)
    torch.testing.assert_close(L.weighting("min-snr", t, schedule, space="eps", gamma=gamma), m / snr, rtol=1e-10, atol=0)
    torch.testing.assert_close(L.weighting("min-snr", t, schedule, space="v", gamma=gamma), m / (snr + 1), rtol=1e-10, atol=0)
    assert (snr > gamma).any() and (snr < gamma).any()  # both branches of the min are exercised


def gaussian_kl(mu1, var1, mu2, var2):
    """KL(N(mu1, var1 I) || N(mu2, var2 I)), summed over the last dim."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mu1 - mu2) ** 2) / var2 - 1).sum(dim=-1)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
@pytest.mark.parametrize("schedule", [S.ddpm_linear(), S.Cosine().discrete()], ids=repr)
def test_vlb_weight_is_the_kl_difference(schedule, variance):
    """Ho et al. 2020, eqs. 7, 11, 12: L_{t-1}(eps_hat) - L_{t-1}(eps) = w_t ||eps - eps_hat||^2."""
    i = torch.tensor([2, 3, 10, 100, 500, 999, schedule.T])
    beta = schedule.betas[i - 1][:, None]
    abar_all = torch.cumprod(1 - schedule.betas, 0)
    abar, abar_prev = abar_all[i - 1][:, None], abar_all[i - 2][:, None]
    g = torch.Generator().manual_seed(11)
    x0, eps = torch.randn(len(i), 6, generator=g, dtype=f64), torch.randn(len(i), 6, generator=g, dtype=f64)
    eps_hat = eps + 0.3 * torch.randn(eps.shape, generator=g, dtype=f64)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    beta_tilde = (1 - abar_prev) / (1 - abar) * beta
    mu_q = abar_prev.sqrt() * beta / (1 - abar) * x0 + (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar) * xt
    var_p = beta if variance == "beta" else beta_tilde

    def L_tm1(e):
        mu_p = (xt - beta / (1 - abar).sqrt() * e) / (1 - beta).sqrt()
        return gaussian_kl(mu_q, beta_tilde, mu_p, var_p)

    diff = L_tm1(eps_hat) - L_tm1(eps)
    w = L.weighting("vlb", i, schedule, space="eps", variance=variance)
    torch.testing.assert_close(w * ((eps - eps_hat) ** 2).sum(dim=1), diff, rtol=1e-8, atol=0)


def test_vlb_weight_at_t1_is_the_gaussian_decoder_nll():
    schedule = S.ddpm_linear()
    beta1 = schedule.betas[0]
    g = torch.Generator().manual_seed(12)
    x0, eps, eps_hat = (torch.randn(4, 5, generator=g, dtype=f64) for _ in range(3))
    x1 = (1 - beta1).sqrt() * x0 + beta1.sqrt() * eps
    nll = lambda e: ((x0 - (x1 - beta1 / beta1.sqrt() * e) / (1 - beta1).sqrt()) ** 2).sum(1) / (2 * beta1)  # noqa: E731
    w = L.weighting("vlb", torch.ones(4, dtype=torch.long), schedule, space="eps")
    torch.testing.assert_close(w * ((eps - eps_hat) ** 2).sum(1), nll(eps_hat) - nll(eps), rtol=1e-9, atol=0)


def test_diffusion_loss_broadcasts_over_image_shapes():
    schedule = S.VPSDE()
    g = torch.Generator().manual_seed(2)
    x, eps, pred = (torch.randn(3, 2, 4, 4, generator=g, dtype=f64) for _ in range(3))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=f64)
    w = torch.tensor([1.0, 2.0, 3.0], dtype=f64)
    a, s = schedule.alpha(t).view(3, 1, 1, 1), schedule.sigma(t).view(3, 1, 1, 1)
    expected = w * ((pred - (a * eps - s * x)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(L.diffusion_loss(pred, x, eps, t, schedule, "v", w), expected, rtol=1e-12, atol=0)


# -- noise-level distributions -----------------------------------------------------------------------
N = 20_000


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def ks(samples, dist):
    p = stats.kstest(samples.numpy(), dist).pvalue
    assert p > 1e-3, p


def test_discrete_uniform_index_and_time():
    schedule = S.DiscreteVP(torch.full((10,), 0.1, dtype=f64))
    d = L.noise_distribution("discrete-uniform")
    i = d.index(N, schedule, gen())
    assert i.dtype == torch.long and int(i.min()) == 1 and int(i.max()) == 10
    counts = torch.bincount(i, minlength=11)[1:].numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    torch.testing.assert_close(d(N, schedule, gen()), i.to(f64) / 10, rtol=0, atol=0)


def test_uniform_and_logit_normal_times():
    ks(L.noise_distribution("uniform", eps=1e-3)(N, S.RectifiedFlow(), gen()), stats.uniform(1e-3, 1 - 1e-3).cdf)
    t = L.noise_distribution("logit-normal", m=0.5, s=0.8)(N, S.RectifiedFlow(), gen())
    ks(torch.log(t / (1 - t)), stats.norm(0.5, 0.8).cdf)


def test_vp_noise_is_uniform_t_for_the_vp_sde_and_inverts_sigma_elsewhere():
    eps_t = 1e-5
    ks(L.noise_distribution("vp")(N, S.VPSDE(), gen()), stats.uniform(eps_t, 1 - eps_t).cdf)
    sigma = L.noise_distribution("vp")(N, S.EDM(), gen())  # EDM time is sigma
    beta_d, beta_min = 19.9, 0.1
    # Karras et al. 2022, Table 1 / eq. 23: sigma^{-1}(sigma) = (sqrt(beta_min^2 + 2 beta_d ln(sigma^2 + 1)) - beta_min) / beta_d
    inv = (torch.sqrt(beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)) - beta_min) / beta_d
    ks(inv, stats.uniform(eps_t, 1 - eps_t).cdf)


def test_ve_noise_is_log_uniform():
    sigma = L.noise_distribution("ve")(N, S.EDM(), gen())
    ks(torch.log(sigma), stats.uniform(math.log(0.02), math.log(100) - math.log(0.02)).cdf)
    ks(L.noise_distribution("ve")(N, S.VE(), gen()), stats.uniform(0, 1).cdf)  # VE: ln sigma linear in t


@pytest.mark.parametrize("schedule", [S.EDM(), S.ddpm_linear(), S.RectifiedFlow()], ids=repr)
def test_edm_noise_is_log_normal_in_sigma_tilde(schedule):
    t = L.noise_distribution("edm")(N, schedule, gen())
    ks(torch.log(schedule.sigma(t) / schedule.alpha(t)), stats.norm(-1.2, 1.2).cdf)


def test_iddpm_noise_draws_only_the_tabulated_levels():
    u = S.iddpm_sigmas(1000, 0.001, 0.008)
    sigma = L.noise_distribution("iddpm")(N, S.EDM(), gen())
    j = torch.argmin((sigma[:, None] - u[None, :-1]).abs(), dim=1)
    torch.testing.assert_close(sigma, u[j], rtol=1e-12, atol=0)
    ks(j.to(f64) + torch.rand(N, generator=gen(1), dtype=f64), stats.uniform(0, 1000).cdf)  # jittered: U{0..M-1}


@pytest.mark.parametrize("name", list(L.NOISE_DISTRIBUTIONS))
def test_noise_distributions_are_deterministic_given_a_seed(name):
    schedule = S.EDM() if name == "iddpm" else S.ddpm_linear()  # iDDPM's u_0 ~ 2e4 exceeds VP's sigma range
    d = L.noise_distribution(name)
    a, b, c = d(64, schedule, gen(7)), d(64, schedule, gen(7)), d(64, schedule, gen(8))
    assert a.shape == (64,) and torch.equal(a, b) and not torch.equal(a, c)
    schedule.check_t(a)


def test_importance_sampler_is_uniform_until_warm_then_follows_the_second_moment():
    """Nichol & Dhariwal 2021, eq. 18: p_t proportional to sqrt(E[L_t^2]) over the last `history`
    losses, mixed with a uniform share; uniform (weight 1) while any step has fewer losses."""
    chain = S.DiscreteVP(torch.full((4,), 0.1, dtype=f64))
    d = L.ImportanceSampler(T=4, history=3, uniform_prob=0.1)
    losses = {1: [1.0, 2.0, 3.0, 4.0], 2: [0.5, 0.5, 0.5], 3: [2.0, 2.0, 2.0]}
    for i in (1, 2, 3):  # step 4 still short of 3 losses: uniform
        d.update(torch.full((len(losses[i]),), i / 4, dtype=f64), torch.tensor(losses[i], dtype=f64))
    d.update(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0], dtype=f64))
    t, w = d.sample(1000, chain, gen())
    assert torch.equal(w, torch.ones_like(w)) and set((t * 4).round().long().tolist()) == {1, 2, 3, 4}
    d.update(torch.tensor([1.0]), torch.tensor([6.0], dtype=f64))  # step 4 now holds 0, 0, 6
    kept = [[2.0, 3.0, 4.0], [0.5] * 3, [2.0] * 3, [0.0, 0.0, 6.0]]  # only the last 3 per step
    rms = torch.tensor([math.sqrt(sum(v * v for v in row) / 3) for row in kept], dtype=f64)
    expected = 0.9 * rms / rms.sum() + 0.1 / 4
    torch.testing.assert_close(d.probabilities(), expected, rtol=1e-12, atol=0)
    t, w = d.sample(N, chain, gen(1))
    i = (t * 4).round().long()
    torch.testing.assert_close(w, 1 / (4 * expected[i - 1]), rtol=1e-12, atol=0)
    observed = torch.bincount(i, minlength=5)[1:].numpy()
    assert stats.chisquare(observed, (N * expected).numpy()).pvalue > 1e-3


def test_importance_sampler_history_equals_a_queue_per_step_fed_one_loss_at_a_time():
    """The vectorised update against its definition: a queue of the last `history` losses per step,
    appended one sample at a time in batch order; batches with many losses at a few steps (more than
    `history` at one step in a batch) and batches of one."""
    import collections

    T, H = 7, 3
    d = L.ImportanceSampler(T=T, history=H)
    queues = [collections.deque(maxlen=H) for _ in range(T)]
    g = gen(11)
    for n in [1, 5, 40, 2, 64, 3, 1, 17]:
        i = torch.randint(1, 4 if n == 40 else T + 1, (n,), generator=g)  # n = 40: steps 1-3 only
        losses = torch.rand(n, generator=g, dtype=f64)
        d.update(i.double() / T, losses)
        for step, loss in zip(i.tolist(), losses.tolist()):
            queues[step - 1].append(loss)
        expected = torch.tensor([list(q) + [0.0] * (H - len(q)) for q in queues], dtype=f64)
        assert torch.equal(d.history, expected) and d.count.tolist() == [len(q) for q in queues]


def test_importance_sampling_keeps_the_mean_and_lowers_the_variance():
    """Monte Carlo: with losses L_i = 1 / i^2 recorded, E_p[L_i / (T p_i)] equals the uniform mean of L
    (within 4 standard errors) and its variance is below that of uniform sampling."""
    T = 50
    chain = S.DiscreteVP(torch.full((T,), 0.02, dtype=f64))
    L_of = lambda i: 1.0 / i.double() ** 2  # noqa: E731
    d = L.ImportanceSampler(T=T, history=2, uniform_prob=0.001)
    steps = torch.arange(1, T + 1).repeat(2)
    d.update(steps / T, L_of(steps))
    t, w = d.sample(N, chain, gen(3))
    estimate = L_of((t * T).round().long()) * w
    uniform = L_of(torch.randint(1, T + 1, (N,), generator=gen(4)))
    exact = L_of(torch.arange(1, T + 1)).mean()
    assert abs(estimate.mean() - exact) < 4 * estimate.std() / math.sqrt(N)
    assert estimate.var() < 0.1 * uniform.var()


# -- errors -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        lambda: L.weighting("nope", 0.5, S.VPSDE()),
        lambda: L.weighting("snr", 0.5, S.VPSDE(), space="nope"),
        lambda: L.noise_distribution("nope"),
        lambda: L.convert_weight(1.0, "x0", "nope", 0.5, S.VPSDE()),
        lambda: L.diffusion_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), 0.5, S.VPSDE(), "nope"),
        lambda: L.diffusion_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 4), 0.5, S.VPSDE(), "eps"),
        lambda: L.min_snr_weight(0.5, S.VPSDE(), gamma=0.0),
        lambda: L.edm_weight(0.5, S.VPSDE(), sigma_data=-1.0),
        lambda: L.vlb_weight(3, S.VPSDE()),
        lambda: L.vlb_weight(0, S.ddpm_linear()),
        lambda: L.vlb_weight(2.5, S.ddpm_linear()),
        lambda: L.vlb_weight(1001, S.ddpm_linear()),
        lambda: L.vlb_weight(1, S.ddpm_linear(), variance="beta_tilde"),
        lambda: L.vlb_weight(3, S.ddpm_linear(), variance="learned"),
        lambda: L.LogNormal(P_std=0.0),
        lambda: L.ImportanceSampler(T=0),
        lambda: L.ImportanceSampler(uniform_prob=2.0),
        lambda: L.ImportanceSampler(T=10).sample(4, S.ddpm_linear()),
        lambda: L.LogitNormal(s=-1.0),
        lambda: L.LogUniform(sigma_min=1.0, sigma_max=0.5),
        lambda: L.Uniform(eps=1.0),
        lambda: L.VPNoise(eps_t=-0.1),
        lambda: L.IDDPMNoise(M=0),
        lambda: L.Uniform()(10, S.EDM()),
        lambda: L.LogitNormal()(10, S.SqrtVE()),
        lambda: L.DiscreteUniform()(10, S.VPSDE()),
        lambda: L.LogNormal()(0, S.EDM()),
    ],
)
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_weighting_defined_in_another_space():
    """Rectified flow's 'constant 1 in flow space' is not L_simple's 'constant 1 in eps space'."""
    sch = S.RectifiedFlow()
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    torch.testing.assert_close(L.weighting("constant", t, sch, space="flow", defined_in="flow"), torch.ones_like(t))
    a, s = sch.alpha(t), sch.sigma(t)
    # eps-space 1 seen in flow space: ||eps err||^2 = (a/s)^2 d^2 and ||u err||^2 = (-1 - s'... ) computed directly
    k_eps, k_flow = -a / s, sch.dalpha(t) - sch.dsigma(t) * a / s
    torch.testing.assert_close(L.weighting("constant", t, sch, space="flow"), (k_eps / k_flow) ** 2)
    with pytest.raises(ValueError, match="unknown parameterization 'velocity'"):
        L.weighting("constant", t, sch, space="flow", defined_in="velocity")


# -- EDM2's learned uncertainty weighting -------------------------------------------------------------
def test_uncertainty_starts_as_the_plain_loss():
    u = L.Uncertainty()
    loss, logsnr = torch.rand(7) + 0.1, torch.linspace(-10, 10, 7)
    assert torch.equal(u.weigh(loss, logsnr), loss)
    assert torch.isfinite(u(torch.tensor([-math.inf, math.inf]))).all()  # zero SNR and clean data


def test_uncertainty_learns_the_log_of_the_mean_loss_per_level():
    """min_u E[L e^-u + u] is u = log E[L | level] (set the derivative 1 - E[L] e^-u to 0): fitted to
    losses L = m(lambda) Exp(1) with a known mean m, exp(u) comes back to m within 10 %."""
    torch.manual_seed(0)
    u = L.Uncertainty()
    opt = torch.optim.Adam(u.parameters(), lr=0.03)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    mean = lambda lam: torch.exp(0.3 * lam) + 0.5
    for _ in range(300):
        lam = torch.rand(1024) * 12 - 6
        loss = mean(lam) * torch.distributions.Exponential(1.0).sample((1024,))
        opt.zero_grad()
        u.weigh(loss, lam).mean().backward()
        opt.step()
        decay.step()
    lam = torch.tensor([-5.0, -2.0, 0.0, 2.0, 5.0])
    with torch.no_grad():
        ratio = torch.exp(u(lam)) / mean(lam)
    assert ((ratio - 1).abs() < 0.1).all(), ratio
