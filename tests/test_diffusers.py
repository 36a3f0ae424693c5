"""diffusers in and out (the optional extra): a random UNet2DModel saved with diffusers'
`save_pretrained` is sampled by diffspace and compared, from the same noise, with diffusers' own
scheduler loops (DDIM eta 0 and 1, DDPM); the betas against diffusers' alphas_cumprod; a diffspace
run with model.network=diffusers exported and sampled by DDPMPipeline. Skipped where diffusers is
not installed (CI installs the extra and runs this file on its own)."""


import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from conftest import ok, one_line_error, perturb_, run  # noqa: E402
from diffspace import diffusers_io  # noqa: E402
from diffspace.config import ModelConfig, SampleConfig  # noqa: E402
from diffspace.model import Diffusion, load_model  # noqa: E402
from diffspace.samplers import SAMPLERS, sampler_nfe  # noqa: E402
from diffspace.sampling import sample  # noqa: E402

SHAPE = (4, 1, 8, 8)


def random_unet(seed=0, num_class_embeds=None):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                 attention_head_dim=8, num_class_embeds=num_class_embeds)
    return perturb_(unet, 0.1, seed).eval()


def save(tmp_path, unet, scheduler, name="model"):
    folder = tmp_path / name
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    return folder


def close(a, b, rel=2e-5):
    """float32 agreement of two sample sets relative to their size (random nets give |x| up to ~300)."""
    scale = max(1.0, float(b.abs().max()))
    err = float((a - b).abs().max())
    assert err <= rel * scale, (err, scale)


def diffusers_loop(unet, scheduler, n_steps, generator, eta=None):
    """diffusers' own sampling loop (as its DDPM / DDIM pipelines run it) from noise drawn first."""
    x = torch.randn(SHAPE, generator=generator)
    scheduler.set_timesteps(n_steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x, t).sample
            kwargs = dict(eta=eta) if eta is not None else {}
            x = scheduler.step(out, t, x, generator=generator, **kwargs).prev_sample
    return x


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing, offset", [("leading", 0), ("leading", 1), ("trailing", 0)])
def test_ddim_eta0_equals_diffusers_loop(tmp_path, prediction, spacing, offset):
    unet = random_unet()
    scheduler = diffusers.DDIMScheduler(prediction_type=prediction, clip_sample=False, timestep_spacing=spacing,
                                        steps_offset=offset)
    model, _, _ = load_model(save(tmp_path, unet, scheduler))
    ours = sample(model, SHAPE[0], SampleConfig(sampler="ddim", nfe=20, seed=3)).x
    close(ours, diffusers_loop(unet, scheduler, 20, torch.Generator().manual_seed(3)))


def test_cli_sample_of_a_ddim_folder_equals_diffusers(tmp_path):
    """The bar: `diffspace sample DIR --sampler ddim --nfe 20` gives diffusers' DDIM images (seed 0's noise)."""
    unet = random_unet(1)
    scheduler = diffusers.DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear", beta_start=0.00085,
                                        beta_end=0.012, steps_offset=1)
    folder = save(tmp_path, unet, scheduler)
    r = ok(run("sample", folder, "--sampler", "ddim", "--nfe", "20", "-n", 4, "--out", tmp_path / "s.png"))
    assert "sampler ddim, 20 steps, NFE 20" in r.stdout
    ours = torch.from_numpy(np.load(tmp_path / "s.npz")["x"])
    close(ours, diffusers_loop(unet, scheduler, 20, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_eta1_step_equals_diffusers_given_its_noise(tmp_path, prediction):
    """One DDIM eta = 1 step from every 5th timestep: diffusers' step with variance_noise z against
    diffspace's ddim on the two levels with a generator whose first draw is z."""
    unet = random_unet()
    scheduler = diffusers.DDIMScheduler(prediction_type=prediction, clip_sample=False)
    model, _, _ = load_model(save(tmp_path, unet, scheduler))
    scheduler.set_timesteps(20)
    abar = scheduler.alphas_cumprod.double()
    for k, t in enumerate(scheduler.timesteps[:-1:5]):
        t_prev = int(t) - 50
        z_t = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10 + k))
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
        with torch.no_grad():
            theirs = scheduler.step(unet(z_t, t).sample, t, z_t, eta=1.0, variance_noise=noise).prev_sample
        s, s_prev = (((1 - abar[i]) / abar[i]).sqrt().item() for i in (int(t), t_prev))
        x = z_t / abar[int(t)].sqrt().float()  # scale-free x~ = z_t / alpha_t
        with torch.no_grad():
            ours = SAMPLERS["ddim"](model, x, torch.tensor([s, s_prev]), eta=1.0, generator=torch.Generator().manual_seed(99))
        close(ours * abar[t_prev].sqrt().float(), theirs)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_ddpm_loop_equals_diffusers_with_clip_and_noise(tmp_path, variance):
    """DDPM ancestral steps, 50 of 1000 (leading), with diffusers' default clip_sample=True (read as
    sample.clip_x0 = 1): the same generator draws the start and each step's noise on both sides."""
    unet = random_unet(2)
    scheduler = diffusers.DDPMScheduler(variance_type=variance)
    model, cfg, _ = load_model(save(tmp_path, unet, scheduler))
    assert cfg.sample.clip_x0 == 1.0 and model.preset.solver == "ddpm"
    ours = sample(model, SHAPE[0], SampleConfig(nfe=50, seed=5, clip_x0=cfg.sample.clip_x0)).x
    close(ours, diffusers_loop(unet, scheduler, 50, torch.Generator().manual_seed(5)))
    unclipped = sample(model, SHAPE[0], SampleConfig(nfe=50, seed=5)).x
    assert float((unclipped - ours).abs().max()) > 1e-2  # the clamp acts on this random net


@pytest.mark.parametrize("config", [
    dict(beta_schedule="linear"), dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"), dict(beta_schedule="linear", rescale_betas_zero_snr=True),
    dict(trained_betas=np.linspace(2e-4, 0.03, 500).tolist(), num_train_timesteps=500),
], ids=["linear", "scaled_linear", "cosine", "zero-snr", "trained"])
def test_chain_matches_diffusers_alphas_cumprod(config):
    theirs = diffusers.DDPMScheduler(**config).alphas_cumprod.double()
    ours = diffusers_io.chain_of({"_class_name": "DDPMScheduler", **config}).alphas_bar[1:]
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=1e-7)


def test_every_sampler_runs_on_a_diffusers_folder(tmp_path):
    model, _, _ = load_model(save(tmp_path, random_unet(), diffusers.DDIMScheduler(prediction_type="v_prediction")))
    for name in SAMPLERS:
        if name == "mala":  # needs an energy model
            continue
        nfe = 0 if name == "adaptive" else max(12, sampler_nfe(name, 1))  # langevin: one level's chain
        s = sample(model, 2, SampleConfig(sampler=name, nfe=nfe, clip_x0=1.0))
        assert s.x.shape == (2, 1, 8, 8) and bool(torch.isfinite(s.x).all()), name


def test_class_conditional_folder_and_autoguidance(tmp_path):
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    folder = save(tmp_path, random_unet(0, num_class_embeds=3), scheduler)
    weak = save(tmp_path, random_unet(4, num_class_embeds=3), scheduler, "weak")
    model, _, _ = load_model(folder)
    assert model.num_classes == 3
    a = sample(model, 3, SampleConfig(sampler="ddim", nfe=10, classes="0,1,2")).x
    b = sample(model, 3, SampleConfig(sampler="ddim", nfe=10, classes="2,2,2")).x
    assert float((a[:2] - b[:2]).abs().max()) > 1e-3 and torch.allclose(a[2], b[2])
    r = ok(run("sample", folder, "--class", "all", "-n", 3, "--guide-run", weak, "--guidance", 2, "--nfe", 10,
               "--out", tmp_path / "g.png"))
    assert "autoguidance w=2" in r.stdout
    one_line_error(run("sample", folder, "--class", 1, "--guidance", 2, "-n", 2), "no null label", "--guide-run")
    one_line_error(run("sample", folder, "-n", 2), "no null label")


def test_eval_of_a_diffusers_folder_against_named_data(tmp_path):
    folder = save(tmp_path, random_unet(), diffusers.DDPMScheduler(clip_sample=True))
    r = ok(run("eval", folder, "-n", 64, "--nll-samples", 8, "--vlb-steps", "20", "--pf-ode-steps", 0, "--nfe", 10,
               "--set", "data.spec=digits"))
    assert "bits/dim" in r.stdout
    one_line_error(run("eval", folder, "-n", 8, "--set", "data.spec=moons"), "shape", "data.spec")


def test_training_a_diffusers_unet_under_other_presets():
    """model.network = 'diffusers': the UNet2DModel is F under EDM's preconditioning and DDPM's eps loss."""
    for preset, param in [("edm", "precond"), ("ddpm", "eps"), ("rectified-flow", "flow")]:
        cfg = ModelConfig(preset=preset, parameterization=param, network="diffusers", base_channels=16,
                          channel_mult=[1, 2], num_blocks=1, attention=[4])
        model = Diffusion.from_config(cfg, (1, 8, 8))
        x = torch.randn(16, 1, 8, 8)
        loss = model.loss(x, None, torch.Generator().manual_seed(0)).mean()
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert torch.isfinite(loss) and grads and all(bool(torch.isfinite(g).all()) for g in grads), preset


def test_export_loads_in_ddpm_pipeline_and_samples_the_same(tmp_path):
    """Train a diffusers-network DDPM run through the CLI, export it, sample it with DDPMPipeline:
    the same images as `diffspace sample` from the same seed (the pipeline draws the start and each
    step's noise from its generator in diffspace's order)."""
    out = tmp_path / "run"
    ok(run("train", "--data", "digits", "--preset", "ddpm", "--steps", 30, "--out", out, "--quiet", "model.network=diffusers",
           "model.base_channels=16", "model.channel_mult=[1,2]", "model.num_blocks=1", "train.batch_size=32",
           "sample.variance=beta_tilde", "log.n_samples=4"))
    ok(run("export", out, "--format", "diffusers", tmp_path / "exp"))
    pipe = diffusers.DDPMPipeline.from_pretrained(tmp_path / "exp", local_files_only=True)
    assert pipe.scheduler.config.variance_type == "fixed_small" and pipe.scheduler.config.timestep_spacing == "trailing"
    images = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), num_inference_steps=20, output_type="np").images
    ok(run("sample", out, "--sampler", "ddpm", "--nfe", 20, "-n", 4, "--out", tmp_path / "s.png"))
    ours = np.load(tmp_path / "s.npz")["x"]
    ours = np.clip(ours / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
    assert images.shape == (4, 8, 8, 1)
    np.testing.assert_allclose(images, ours, atol=2e-4)


def test_bad_folders_and_exports_get_one_line_errors(tmp_path):
    unet = random_unet()
    bad = save(tmp_path, unet, diffusers.LMSDiscreteScheduler(), "lms")
    one_line_error(run("sample", bad, "-n", 2), "LMSDiscreteScheduler", "allowed", "DDIMScheduler")
    thresh = save(tmp_path, unet, diffusers.DDPMScheduler(thresholding=True), "thresh")
    one_line_error(run("sample", thresh, "-n", 2), "thresholding")
    eps_zero = save(tmp_path, unet, diffusers.DDPMScheduler(rescale_betas_zero_snr=True), "zsnr")
    one_line_error(run("sample", eps_zero, "-n", 2), "epsilon", "zero terminal SNR")
    edm = tmp_path / "edm"
    ok(run("train", "--data", "digits", "--preset", "edm", "--steps", 2, "--out", edm, "--quiet", "model.network=diffusers",
           "model.base_channels=16", "model.num_blocks=1", "train.batch_size=8", "log.n_samples=2"))
    one_line_error(run("export", edm, tmp_path / "e1"), "discrete chain", "'edm'")
    own = tmp_path / "own"
    ok(run("train", "--data", "digits", "--preset", "ddpm", "--steps", 2, "--out", own, "--quiet",
           "model.base_channels=16", "model.num_blocks=1", "train.batch_size=8", "log.n_samples=2"))
    one_line_error(run("export", own, tmp_path / "e2"), "model.network='diffusers'")
    one_line_error(run("train", "--data", "moons", "--steps", 2, "--out", tmp_path / "m", "--quiet",
                       "model.network=diffusers"), "(C, H, W) images")
    one_line_error(run("train", "--data", "digits", "--steps", 2, "--out", tmp_path / "m2", "--quiet",
                       "model.network=unet2d"), "model.network", "diffusers")


def test_a_diffusers_autoencoderkl_folder_as_the_latent_encoder(tmp_path):
    """data.encoder = a local AutoencoderKL folder: its posterior mean x scaling_factor, decoded back."""
    from diffspace.encoder import load_encoder

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=(8, 16), latent_channels=2,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=4, sample_size=8, scaling_factor=0.7)
    vae.save_pretrained(tmp_path / "vae")
    enc = load_encoder(str(tmp_path / "vae"))
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        torch.testing.assert_close(enc.encode(x), 0.7 * mean)
        torch.testing.assert_close(enc.decode(0.7 * mean), vae.decode(mean).sample)
    ok(run("train", "--data", "digits", "--steps", 5, "--out", tmp_path / "lat", "--quiet", f"data.encoder={tmp_path / 'vae'}",
           "model.base_channels=8", "model.channel_mult=[1]", "model.num_blocks=1", "train.batch_size=16", "log.n_samples=4"))
    ok(run("sample", tmp_path / "lat", "-n", 3, "--nfe", 6, "--out", tmp_path / "s.png"))
    assert np.load(tmp_path / "s.npz")["x"].shape == (3, 1, 8, 8)
