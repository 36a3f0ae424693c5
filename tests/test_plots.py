"""Every figure writes a valid, non-blank PNG; the numbers behind the figures are checked against
independent computations (loss per noise level, the loss-weighting table)."""

import inspect
import math

import numpy as np
import pytest
import torch
from PIL import Image

from diffspace import plots
from diffspace import schedules as S
from diffspace.analytic import ring8
from diffspace.nn import MLP
from diffspace.presets import PRESETS, get_preset
from diffspace.samplers import SAMPLERS, get_sigmas
from diffspace.model import Diffusion

F64 = torch.float64


def _assert_png(path, min_size=(200, 150)):
    """A valid PNG of a sensible size whose grey levels vary (not a blank canvas)."""
    assert path.is_file() and 2_000 < path.stat().st_size < 5_000_000, path
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        grey = np.asarray(img.convert("L"), dtype=float)
    h, w = grey.shape
    assert min_size[0] <= w <= 4000 and min_size[1] <= h <= 4000, (path, w, h)
    assert grey.std() > 8, f"{path} looks blank (grey std {grey.std():.1f})"
    assert len(np.unique(grey)) > 30, f"{path} has only {len(np.unique(grey))} grey levels"


def _model(preset: str, parameterization: str = "precond", hidden: int = 16, random_output: bool = False) -> Diffusion:
    torch.manual_seed(0)
    net = MLP(2, hidden=hidden, depth=1, emb_dim=16)
    if random_output:  # a fresh MLP outputs exactly 0; make the prediction depend on the input
        torch.nn.init.normal_(net.out.weight, std=0.5)
    return Diffusion(net, get_preset(preset), parameterization).eval()


def _points(n=64, seed=0):
    return ring8().sample(n, torch.Generator().manual_seed(seed)).float()


def _images(n, seed=0, size=8):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- the figures that existed before ---------------------------------------------------------------------
def test_forward_process_figure(tmp_path):
    schedules = {"ddpm-linear": S.ddpm_linear(), "cosine": S.Cosine(), "edm": S.EDM()}
    _assert_png(plots.forward_process_figure(tmp_path / "fwd.png", schedules, shown="cosine"))


def test_save_samples_images_and_points(tmp_path):
    _assert_png(plots.save_samples(_images(16), tmp_path / "grid.png"), min_size=(100, 100))
    _assert_png(plots.save_samples(_points(), tmp_path / "pts.png", reference=_points(seed=1)))
    _assert_png(plots.save_samples(_points(), tmp_path / "pts_only.png"))


def test_samples_vs_data(tmp_path):
    _assert_png(plots.samples_vs_data(_images(20), _images(20, seed=1), tmp_path / "svd.png"))


def test_forward_process_images(tmp_path):
    _assert_png(plots.forward_process_images(_images(3), None, tmp_path / "fwd_img.png"))
    _assert_png(plots.forward_process_images(_images(2), S.Cosine(), tmp_path / "fwd_cos.png"))


def test_reverse_snapshots(tmp_path):
    sigmas = get_sigmas("edm", 5)[:-1].tolist()
    snaps = [(s, _images(2, k) * (1 + s), _images(2, k + 10)) for k, s in enumerate(sigmas)]
    _assert_png(plots.reverse_snapshots(snaps, tmp_path / "rev.png", columns=4), min_size=(150, 150))


def test_loss_curve(tmp_path):
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,loss,lr\n" + "".join(f"{s},{2.0 / (1 + s / 10):.4f},0.001\n" for s in range(0, 200, 10)))
    _assert_png(plots.loss_curve(csv, tmp_path / "loss.png"))


# -- reverse trajectories ---------------------------------------------------------------------------------
def test_trajectory_holds_the_start_every_step_and_the_final_sample():
    mixture, sigmas = ring8(), get_sigmas("edm", 6)
    x = 80 * torch.randn(10, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    for name, options in [("heun", {}), ("edm_sde", {"S_churn": 40.0})]:
        levels, states = plots.trajectory(name, mixture, x, sigmas, torch.Generator().manual_seed(2), **options)
        out = SAMPLERS[name](mixture, x, sigmas, generator=torch.Generator().manual_seed(2), **options)
        assert states.shape == (6 + 2, 10, 2) and levels.shape == (6 + 2,)
        assert torch.equal(states[0], x) and levels[0] == 80 and levels[-1] == 0
        assert torch.equal(states[-1], out)
    assert levels[1] > 80  # edm_sde reports the state after churn, at sigma_hat = (1 + gamma) sigma
    scaled = plots.vp_scaled(states, levels)
    torch.testing.assert_close(scaled * torch.sqrt(1 + levels**2)[:, None, None], states)
    assert scaled[0].std() == pytest.approx(x.std().item() / math.sqrt(1 + 80**2), rel=1e-12)


def test_reverse_trajectories_over_a_density_and_over_reference_points(tmp_path):
    mixture = ring8()
    _assert_png(plots.reverse_trajectories(mixture, tmp_path / "traj.png", log_density=mixture.log_prob,
                                           n=12, steps=8), min_size=(600, 300))
    model = _model("edm", random_output=True)  # an untrained network as D(x, sigma)
    _assert_png(plots.reverse_trajectories(model, tmp_path / "traj_ref.png", reference=_points(500), n=12,
                                           steps=6, churn=5.0), min_size=(600, 300))


# -- loss per noise level ---------------------------------------------------------------------------------
def test_loss_per_noise_level_equals_a_direct_computation_at_one_level():
    model, x = _model("edm", random_output=True), _points()
    t, lam, loss = plots.loss_per_noise_level(model, x, n_levels=6, seed=3)
    assert t.shape == lam.shape == loss.shape == (6,)
    k = 2
    g = torch.Generator().manual_seed(3)
    direct = model.loss(x, None, g, t=torch.full((len(x),), float(t[k]), dtype=F64)).mean()
    assert loss[k].item() == pytest.approx(direct.item(), rel=1e-6)
    torch.testing.assert_close(lam, model.schedule.logsnr(t))


def test_loss_per_noise_level_of_zero_networks_by_hand():
    """A fresh MLP outputs 0, so the losses have closed forms in the noise eps alone:
    DDPM eps-prediction, L_simple: mean eps^2 at every level; EDM precond, D = c_skip x~:
    lambda (D - x)^2 = (sigma_data^2 eps - sigma x)^2 / (sigma_data^2 (sigma^2 + sigma_data^2))."""
    x = _points(128).double()
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    t, _, loss = plots.loss_per_noise_level(_model("ddpm", "eps").double(), x, n_levels=5, seed=5)
    torch.testing.assert_close(loss, (eps**2).mean().expand(len(t)))
    t, lam, loss = plots.loss_per_noise_level(_model("edm").double(), x, n_levels=5, seed=5)
    sigma, sd2 = torch.exp(-lam / 2)[:, None, None], 0.25
    expected = ((sd2 * eps - sigma * x) ** 2 / (sd2 * (sigma**2 + sd2))).mean(dim=(1, 2))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)  # Diffusion.loss squares in float32
    torch.testing.assert_close(sigma.flatten(), t)  # EDM: time is sigma


def test_noise_levels_span_the_training_range_and_respect_discrete_chains():
    edm = _model("edm")
    t = plots.noise_levels(edm, 8)
    lam = edm.schedule.logsnr(t)
    assert (lam.diff() > 0).all()
    drawn = edm.schedule.logsnr(edm.noise(10_000, edm.schedule, generator=torch.Generator().manual_seed(0)))
    assert lam[0] == pytest.approx(drawn.min().item()) and lam[-1] == pytest.approx(drawn.max().item())
    ddpm = _model("ddpm", "eps")
    t = plots.noise_levels(ddpm, 40)
    steps = t * ddpm.schedule.T
    torch.testing.assert_close(steps, torch.round(steps), rtol=0, atol=1e-9)
    assert steps.min() >= 1 and steps.max() == 1000 and (ddpm.schedule.logsnr(t).diff() > 0).all()
    ve = _model("ve")
    lam = ve.schedule.logsnr(plots.noise_levels(ve, 5, logsnr_range=(-20.0, 20.0)))
    assert lam[0] == pytest.approx(-2 * math.log(100.0)) and lam[-1] == pytest.approx(-2 * math.log(0.02))


def test_loss_per_noise_level_figure_compares_models(tmp_path):
    models = {"edm": _model("edm", random_output=True), "ddpm eps": _model("ddpm", "eps", random_output=True)}
    _assert_png(plots.loss_per_noise_level_figure(models, _points(), tmp_path / "lpn.png", n_levels=6))
    _assert_png(plots.loss_per_noise_level_figure(models["edm"], _points(), tmp_path / "one.png", n_levels=4))


# -- the loss-weighting table -------------------------------------------------------------------------------
def test_lsimple_weights_on_a_vp_schedule():
    """L_simple's weight in each space on VP (cosine): eps 1, x0 SNR = e^lambda, v alpha^2 = sigmoid(lambda),
    score sigma^2 = sigmoid(-lambda); on rectified flow its flow weight is alpha^2 = sigmoid(lambda/2)^2."""
    lam = torch.linspace(-8, 8, 33, dtype=F64)
    w = plots.lsimple_weights(S.Cosine(), lam)
    assert set(w) == {"x0", "eps", "v", "flow", "score"}
    torch.testing.assert_close(w["eps"], torch.ones_like(lam))
    torch.testing.assert_close(w["x0"], torch.exp(lam))
    torch.testing.assert_close(w["v"], torch.sigmoid(lam))
    torch.testing.assert_close(w["score"], torch.sigmoid(-lam))
    torch.testing.assert_close(plots.lsimple_weights(S.RectifiedFlow(), lam)["flow"], torch.sigmoid(lam / 2) ** 2)


def test_every_presets_x0_weight_in_closed_form():
    """Karras et al. (2022) Table 1 lambda(sigma), sigma^2 = exp(-lambda): VP, VE, iDDPM 1/sigma^2; EDM
    1/sigma^2 + 1/sigma_data^2; DDPM's L_simple SNR; rectified flow's flow loss (1 + sigma)^2 / sigma^2;
    zero terminal SNR's v loss 1 + SNR."""
    expected = {"vp": lambda l: torch.exp(l), "ve": lambda l: torch.exp(l), "iddpm": lambda l: torch.exp(l),
                "ddpm": lambda l: torch.exp(l), "edm": lambda l: torch.exp(l) + 1 / 0.5**2,
                "rectified-flow": lambda l: (1 + torch.exp(l / 2)) ** 2,
                "ztsnr": lambda l: 1 + torch.exp(l)}  # v-space 1: 1 / sigma_t^2 = 1 + SNR
    assert set(expected) == set(PRESETS)
    for name, preset in PRESETS.items():
        lam, w = plots.preset_x0_weight(preset)
        assert len(lam) > 100 and lam.min() >= -12 and lam.max() <= 12, name
        torch.testing.assert_close(w, expected[name](lam), msg=name)
    lam, _ = plots.preset_x0_weight(PRESETS["ve"])
    assert lam.min() == pytest.approx(-2 * math.log(100.0)) and lam.max() == pytest.approx(-2 * math.log(0.02))


def test_ddpm_vlb_weight_on_the_discrete_chain():
    """Ho et al. (2020) eq. 12 with sigma_t^2 = beta_t, in x0 space (times SNR_i), at the steps i = 1..T."""
    chain = S.ddpm_linear()
    lam, w = plots.x0_weight(chain, "vlb", logsnr_range=(-100.0, 100.0))
    beta, abar = chain.betas, chain.alphas_bar[1:]
    torch.testing.assert_close(lam, torch.log(abar / (1 - abar)))
    torch.testing.assert_close(w, beta / (2 * (1 - beta) * (1 - abar)) * abar / (1 - abar))


def test_weighting_figure(tmp_path):
    _assert_png(plots.weighting_figure(tmp_path / "w.png"), min_size=(800, 300))
    _assert_png(plots.weighting_figure(tmp_path / "w_vp.png", S.VPSDE()), min_size=(800, 300))


# -- comparisons ----------------------------------------------------------------------------------------------
def test_quality_vs_nfe(tmp_path):
    results = {"edm / heun": {3: 0.5, 9: 0.12, 35: 0.031}, "edm / deis_pc": {5: 0.2, 10: 0.05, 20: 0.024}}
    _assert_png(plots.quality_vs_nfe(results, tmp_path / "q.png", metric_name="sliced W2", floor=0.02))
    _assert_png(plots.quality_vs_nfe(results, tmp_path / "q_log.png", metric_name="sliced W2", log_y=True))


def test_bar_table(tmp_path):
    rows = {"edm": {"sliced W2": 0.03, "bits/dim": 3.2}, "ddpm eps": {"sliced W2": 0.05, "bits/dim": 3.0},
            "vlb": {"bits/dim": 2.9}}
    _assert_png(plots.bar_table(rows, tmp_path / "bars.png", floors={"sliced W2": 0.02}))


def test_tradeoff(tmp_path):
    points = {"conditional, w = 1": (0.97, 7.0), "CFG w = 0": (0.1, 12.4), "CFG w = 2": (1.0, 13.4),
              "autoguidance w = 2": (0.98, 8.7)}
    _assert_png(plots.tradeoff(points, tmp_path / "t.png", x_name="label agreement", y_name="FD", floor=(0.99, 2.5)))


def test_save_samples_with_labels_one_row_per_class(tmp_path):
    from PIL import Image

    x = torch.rand(20, 1, 8, 8) * 2 - 1
    path = plots.save_samples(x, tmp_path / "g.png", labels=torch.arange(20) // 5)  # 4 classes x 5
    img = Image.open(path)
    assert img.width > img.height  # 5 columns, 4 rows
    _assert_png(plots.save_samples(torch.randn(50, 2), tmp_path / "p.png", labels=torch.arange(50) % 3))


def test_samples_side_by_side_draws_every_panel_on_shared_axes(tmp_path):
    from PIL import Image

    ring = torch.randn(300, 2)
    path = plots.samples_side_by_side({"near": ring * 0.5, "spread": ring * 50, "a\nb": ring}, tmp_path / "s.png",
                                      reference=ring, title="t", columns=2)
    img = Image.open(path)
    assert img.height > img.width * 0.9  # 4 panels (data first) in 2 columns: 2 rows
    _assert_png(path)
    _assert_png(plots.samples_side_by_side({"x": torch.rand(10, 1, 8, 8) * 2 - 1}, tmp_path / "i.png",
                                           reference=torch.rand(10, 1, 8, 8) * 2 - 1))


def test_every_figure_function_is_tested():
    """Each public function of plots that writes to a `path` has a test above."""
    figures = {name for name, f in inspect.getmembers(plots, inspect.isfunction)
               if f.__module__ == plots.__name__ and not name.startswith("_")
               and "path" in inspect.signature(f).parameters}
    tested = {"forward_process_figure", "save_samples", "samples_vs_data", "forward_process_images",
              "reverse_snapshots", "loss_curve", "reverse_trajectories", "loss_per_noise_level_figure",
              "weighting_figure", "quality_vs_nfe", "bar_table", "tradeoff", "samples_side_by_side"}
    assert figures == tested
