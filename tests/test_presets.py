"""Presets against Karras et al. (2022) Table 1, Ho et al. (2020), rectified flow and zero terminal SNR (Lin et
al. 2024; its own checks in test_ztsnr.py), typed from the papers."""

import dataclasses

import numpy as np
import pytest
import torch

from diffspace import losses, samplers
from diffspace.parameterization import PARAMETERIZATIONS
from diffspace.presets import PRESETS, ROWS, get_preset, presets_table

F64 = torch.float64
NAMES = ["vp", "ve", "iddpm", "edm", "ddpm", "rectified-flow", "ztsnr"]

PAPER = {  # Table 1 "Parameters" rows; Ho et al. 2020 sec. 4; Esser et al. 2024 logit-normal(0, 1)
    "vp": dict(beta_d=19.9, beta_min=0.1, eps_s=1e-3, eps_t=1e-5, M=1000),
    "ve": dict(sigma_min=0.02, sigma_max=100),
    "iddpm": dict(C1=0.001, C2=0.008, M=1000, j0=8),
    "edm": dict(sigma_min=0.002, sigma_max=80, sigma_data=0.5, rho=7, P_mean=-1.2, P_std=1.2),
    "ddpm": dict(T=1000, beta_start=1e-4, beta_end=0.02),
    "rectified-flow": dict(t_min=1e-3, t_max=0.999, m=0, s=1),
    "ztsnr": dict(T=1000, beta_start=1e-4, beta_end=0.02),  # Ho et al.'s chain, rescaled (Lin et al. 2024, Alg. 1)
}
ROWS_OF = {  # solver, time-step rule, architecture, noise, weighting, the weighting's loss space
    "vp": ("euler", "vp", "DDPM++", "vp", "inverse-sigma2", "x0"),
    "ve": ("euler", "ve", "NCSN++", "ve", "inverse-sigma2", "x0"),
    "iddpm": ("euler", "iddpm", "DDPM", "iddpm", "inverse-sigma2", "x0"),
    "edm": ("heun", "edm", "any", "edm", "edm", "x0"),
    "ddpm": ("ddpm", "ddpm", "DDPM", "discrete-uniform", "constant", "eps"),
    "rectified-flow": ("euler", "flow", "any", "logit-normal", "constant", "flow"),
    "ztsnr": ("ddim", "ddpm", "any", "discrete-uniform", "constant", "v"),
}


def vp_sigma(t, beta_d=19.9, beta_min=0.1):
    return np.sqrt(np.exp(0.5 * beta_d * t**2 + beta_min * t) - 1)


def ddpm_alpha_bar():
    """alpha-bar_i, i = 0..1000, of Ho et al.'s linear betas 1e-4..0.02."""
    return np.concatenate([[1.0], np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))])


def iddpm_u(M=1000, C1=0.001, C2=0.008):
    abar = np.sin(0.5 * np.pi * np.arange(M + 1) / (M * (C2 + 1))) ** 2
    u = np.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(abar[j - 1] / abar[j], C1) - 1)
    return u


def test_the_seven_presets_and_their_numbers():
    assert list(PRESETS) == NAMES
    for name in NAMES:
        assert dict(get_preset(name).params) == PAPER[name], name


@pytest.mark.parametrize("name", NAMES)
def test_named_rows(name):
    p = get_preset(name)
    assert (p.solver, p.time_steps, p.architecture, p.noise, p.weighting, p.weighting_space) == ROWS_OF[name]
    assert p.solver in samplers.SAMPLERS and p.time_steps in samplers.GRIDS
    assert p.noise in losses.NOISE_DISTRIBUTIONS and p.weighting in losses.WEIGHTINGS
    assert p.weighting_space in PARAMETERIZATIONS


T_GRID = np.array([1e-3, 0.1, 0.37, 0.8, 1.0])


@pytest.mark.parametrize(
    "name, sigma, scale, t",
    [
        ("vp", vp_sigma(T_GRID), 1 / np.sqrt(vp_sigma(T_GRID) ** 2 + 1), T_GRID),
        ("ve", np.sqrt([1e-4, 0.3, 4.0, 1e4]), np.ones(4), np.array([1e-4, 0.3, 4.0, 1e4])),
        ("iddpm", np.array([0.002, 1.0, 80.0]), np.ones(3), np.array([0.002, 1.0, 80.0])),
        ("edm", np.array([0.002, 1.0, 80.0]), np.ones(3), np.array([0.002, 1.0, 80.0])),
        ("ddpm", np.sqrt(1 / ddpm_alpha_bar()[[1, 10, 500, 1000]] - 1), np.sqrt(ddpm_alpha_bar()[[1, 10, 500, 1000]]),
         np.array([1, 10, 500, 1000]) / 1000),
        ("rectified-flow", np.array([0.1, 0.5, 0.9]) / (1 - np.array([0.1, 0.5, 0.9])), 1 - np.array([0.1, 0.5, 0.9]),
         np.array([0.1, 0.5, 0.9])),
    ],
)
def test_sampling_schedule_is_the_table_schedule_and_scaling(name, sigma, scale, t):
    sch = get_preset(name).schedule
    tt = torch.tensor(t, dtype=F64)
    np.testing.assert_allclose(sch.sigma_tilde(tt).numpy(), sigma, rtol=1e-10)
    np.testing.assert_allclose(sch.alpha(tt).numpy(), scale, rtol=1e-10)


def test_training_schedules_hold_the_preset_numbers():
    vp = get_preset("vp")
    assert (vp.training_schedule.beta_d, vp.training_schedule.beta_min, vp.precond.M) == (19.9, 0.1, 1000)
    ve = get_preset("ve").training_schedule
    np.testing.assert_allclose(ve.sigma(torch.tensor([0.0, 1.0], dtype=F64)).numpy(), [0.02, 100], rtol=1e-12)
    edm = get_preset("edm").training_schedule
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data, edm.rho) == (0.002, 80, 0.5, 7)
    # iDDPM trains on the clipped cosine chain whose sigma~ at step M - j is u_j
    chain = get_preset("iddpm").training_schedule
    j = np.array([0, 1, 8, 500, 999])
    steps = torch.tensor((1000 - j) / 1000, dtype=F64)
    np.testing.assert_allclose(chain.sigma_tilde(steps).numpy(), iddpm_u()[j], rtol=1e-9)
    ddpm = get_preset("ddpm").training_schedule
    np.testing.assert_allclose(ddpm.alphas_bar.numpy(), ddpm_alpha_bar(), rtol=1e-12)


SIGMAS = np.array([0.002, 0.4, 1.0, 7.0, 80.0])


def table1_c(name, s):
    """Table 1's c_skip, c_out, c_in, c_noise (DDPM: the VP form on its chain; flow: t = s / (1 + s))."""
    one = np.ones_like(s)
    if name == "vp":
        c_noise = 999 * (-0.1 + np.sqrt(0.01 + 2 * 19.9 * np.log1p(s**2))) / 19.9
        return one, -s, 1 / np.sqrt(s**2 + 1), c_noise
    if name == "ve":
        return one, s, one, np.log(0.5 * s)
    if name == "iddpm":
        return one, -s, 1 / np.sqrt(s**2 + 1), 999 - np.abs(iddpm_u()[None] - s[:, None]).argmin(1)
    if name == "edm":
        return 0.25 / (s**2 + 0.25), 0.5 * s / np.sqrt(0.25 + s**2), 1 / np.sqrt(s**2 + 0.25), np.log(s) / 4
    return 1 / (1 + s), -s / (1 + s), 1 / (1 + s), s / (1 + s)


@pytest.mark.parametrize("name", ["vp", "ve", "iddpm", "edm", "rectified-flow"])
def test_preset_preconditioner_is_table1(name):
    got = get_preset(name).precond(torch.tensor(SIGMAS, dtype=F64))
    for c_got, c_want in zip(got, table1_c(name, SIGMAS)):
        np.testing.assert_allclose(c_got.numpy(), c_want, rtol=1e-12, atol=1e-12)


def test_ddpm_preconditioner_is_the_eps_model_on_its_chain():
    c_skip, c_out, c_in, c_noise = get_preset("ddpm").precond(torch.tensor(SIGMAS[:4], dtype=F64))
    np.testing.assert_allclose(c_out.numpy(), -SIGMAS[:4], rtol=1e-12)
    np.testing.assert_allclose(c_in.numpy(), 1 / np.sqrt(SIGMAS[:4] ** 2 + 1), rtol=1e-12)
    # c_noise = 1000 t - 1, the 0-based step index (Ho et al.'s code, diffusers), with sigma~(t) = sigma:
    # log alpha-bar is linear in t between the steps i / 1000
    log_abar = np.interp(c_noise.numpy() + 1, np.arange(1001), np.log(ddpm_alpha_bar()))
    np.testing.assert_allclose(np.sqrt(np.exp(-log_abar) - 1), SIGMAS[:4], rtol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_preset_denoiser_with_the_ideal_raw_output_gives_back_x(name):
    p = get_preset(name)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(4, 3, generator=g, dtype=F64)
    sigma = torch.tensor(SIGMAS[:4], dtype=F64)
    x_noisy = x + sigma[:, None] * eps
    c_skip, c_out, _, _ = (c[:, None] for c in p.precond(sigma))
    D = p.denoiser(lambda inp, cond: (x - c_skip * x_noisy) / c_out)(x_noisy, sigma)
    torch.testing.assert_close(D, x, rtol=0, atol=1e-12)


def test_time_steps_follow_the_table():
    N, i = 18, np.arange(18)
    want = {
        "vp": vp_sigma(1 + i / (N - 1) * (1e-3 - 1)),
        "ve": np.sqrt(100.0**2 * (0.02**2 / 100.0**2) ** (i / (N - 1))),
        "iddpm": iddpm_u()[np.floor(8 + (1000 - 1 - 8) / (N - 1) * i + 0.5).astype(int)],
        "edm": (80 ** (1 / 7) + i / (N - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7,
    }
    for name, sigmas in want.items():
        p = get_preset(name)
        got = samplers.get_sigmas(p.time_steps, N, **p.time_step_kwargs)
        np.testing.assert_allclose(got.numpy(), np.append(sigmas, 0), rtol=1e-10, err_msg=name)
    ddpm = get_preset("ddpm")
    got = samplers.get_sigmas(ddpm.time_steps, 1000, **ddpm.time_step_kwargs)  # every step, T..1
    np.testing.assert_allclose(got.numpy(), np.append(np.sqrt(1 / ddpm_alpha_bar()[1000:0:-1] - 1), 0), rtol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_noise_distribution_and_weighting_build_from_the_preset(name):
    p = get_preset(name)
    t = losses.noise_distribution(p.noise, **p.noise_kwargs)(64, p.training_schedule, torch.Generator().manual_seed(0))
    assert t.shape == (64,) and bool(torch.isfinite(t).all())
    w = losses.weighting(p.weighting, t, p.training_schedule, **p.weighting_kwargs)
    assert w.shape == (64,) and bool((w > 0).all())
    if p.weighting_space == "x0":  # Table 1's lambda(sigma) on (D - x)^2
        s = p.training_schedule.sigma_tilde(t).numpy()
        lam = (s**2 + 0.25) / (s * 0.5) ** 2 if name == "edm" else 1 / s**2
        np.testing.assert_allclose(w.numpy(), lam, rtol=1e-10)


def test_table_lists_every_preset_and_row():
    table = presets_table()
    assert ROWS == ("reference", "solver", "time steps", "schedule", "scaling", "architecture", "c_skip", "c_out",
                    "c_in", "c_noise", "noise distribution", "loss weighting", "parameters")
    lines = table.splitlines()
    assert all(name in lines[0] for name in NAMES)
    for row in ROWS:
        assert sum(line.startswith(f"| {row} |") for line in lines) == 1, row
    assert all(line.count("|") == len(NAMES) + 2 for line in lines)  # no cell breaks the Markdown table


def test_unknown_name_and_immutability():
    with pytest.raises(ValueError, match="allowed: vp, ve, iddpm, edm, ddpm, rectified-flow, ztsnr"):
        get_preset("ddim")
    p = get_preset("edm")
    assert {p: 1}[p] == 1  # hashable (by identity)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.solver = "euler"
    with pytest.raises(TypeError):
        p.params["sigma_data"] = 1.0
    with pytest.raises(ValueError, match="sigma"):
        p.denoiser(lambda inp, cond: inp)(torch.zeros(2, 3, dtype=F64), -1.0)


# -- model.preset_params: some of a column's numbers changed ------------------------------------------
def test_changed_sigma_data_moves_every_part_of_the_edm_column():
    """sigma_data = 0.75 (about the digits' 0.752): at sigma = sigma_data the preconditioner has
    c_skip = 1/2, c_out = sigma_data / sqrt(2), c_in = 1 / (sigma_data sqrt(2)) (Karras et al. 2022,
    eq. 7 by hand), the weighting lambda c_out^2 = 1 (eq. 8), and the published preset stays 0.5."""
    sd = 0.75
    p = get_preset("edm", {"sigma_data": sd})
    c_skip, c_out, c_in, _ = p.precond(torch.tensor([sd], dtype=F64))
    assert torch.allclose(c_skip, torch.tensor([0.5], dtype=F64))
    assert torch.allclose(c_out, torch.tensor([sd / 2 ** 0.5], dtype=F64))
    assert torch.allclose(c_in, torch.tensor([1 / (sd * 2 ** 0.5)], dtype=F64))
    t = torch.tensor([0.1, sd, 5.0], dtype=F64)
    lam = losses.weighting(p.weighting, t, p.training_schedule, space="x0", **p.weighting_kwargs)
    c_out_t = p.precond(t)[1]
    assert torch.allclose(lam * c_out_t**2, torch.ones(3, dtype=F64))
    assert p.params["sigma_data"] == sd and p.schedule.sigma_data == sd
    assert get_preset("edm").params["sigma_data"] == 0.5 and PRESETS["edm"].precond.sigma_data == 0.5


def test_changed_noise_levels_are_drawn_from_the_new_log_normal():
    p = get_preset("edm", {"P_mean": -0.4, "P_std": 0.8})
    dist = losses.noise_distribution(p.noise, **p.noise_kwargs)
    log_sigma = torch.log(p.training_schedule.sigma_tilde(dist(40_000, p.training_schedule, torch.Generator().manual_seed(0))))
    se = 0.8 / 40_000 ** 0.5
    assert abs(log_sigma.mean().item() + 0.4) < 4 * se and abs(log_sigma.std().item() - 0.8) < 0.01


def test_changed_chain_length_gives_a_shorter_ddpm_chain():
    p = get_preset("ddpm", {"T": 200})
    assert p.training_schedule.T == 200 and p.params["T"] == 200 and isinstance(p.params["T"], int)


@pytest.mark.parametrize("name,params,words", [
    ("edm", {"sigma_dat": 0.7}, ["'sigma_dat'", "allowed:", "sigma_data"]),
    ("edm", {"sigma_data": "big"}, ["sigma_data", "finite number"]),
    ("edm", {"sigma_data": float("nan")}, ["sigma_data", "finite number"]),
    ("ddpm", {"T": 2.5}, ["T", "integer"]),
    ("edm", {"sigma_data": -1.0}, ["edm", "sigma_data"]),
    ("edm", {"P_std": 0}, ["preset 'edm' with {'P_std': 0}", "P_std=0.0 must be > 0"]),  # the noise distribution's own check
])
def test_bad_preset_params_are_refused_by_name(name, params, words):
    with pytest.raises(ValueError) as e:
        get_preset(name, params)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
