"""Latent diffusion (Rombach et al. 2022) as a user runs it: `train-autoencoder` on the digits, then
`train data.encoder=AE_RUN`, `sample` and `eval` in pixels; the autoencoder's KL against torch's own,
its reconstructions against the trivial mean-image baseline, the Encoder's scale against a direct
measurement, and one-line errors where a latent run cannot go."""

import math

import numpy as np
import pytest
import torch

from conftest import ok, one_line_error, run
from diffspace.config import ModelConfig
from diffspace.encoder import LATENT_STD, Encoder, load_encoder
from diffspace.model import LatentAutoencoder, load_model
from diffspace.train import load_data

AE = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.num_blocks=1", "model.latent_channels=2",
      "train.batch_size=64", "train.lr=3e-3", "log.every=50"]


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent") / "ae"
    r = ok(run("train-autoencoder", "--data", "digits", "--steps", 300, "--out", out, "--quiet", *AE))
    return out, r.stdout


def test_kl_term_is_torchs_kl_of_the_posterior():
    cfg = ModelConfig(kind="autoencoder", base_channels=8, channel_mult=[1, 2], num_blocks=1, latent_channels=2,
                      kl_weight=0.37)
    ae = LatentAutoencoder.from_config(cfg, (1, 8, 8))
    x, eps = torch.rand(5, 1, 8, 8) * 2 - 1, torch.randn(5, 2, 4, 4)
    mean, logvar = ae.F.encode(x)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).flatten(1).mean(1)
    mse = ((ae.F.decode(mean + torch.exp(0.5 * logvar) * eps) - x) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(ae.loss(x, eps=eps), mse + 0.37 * kl, rtol=1e-5, atol=1e-6)


def test_pixel_encoder_is_the_identity():
    x = torch.randn(3, 1, 8, 8)
    enc = Encoder()
    assert enc.encode(x) is x and enc.decode(x) is x and not enc.latent


def test_autoencoder_beats_the_mean_image_and_the_scale_gives_std_half(ae_run):
    out, stdout = ae_run
    psnr = float(stdout.split("PSNR ")[1].split(" dB")[0])
    ae, cfg, _ = load_model(out, kind="autoencoder")
    _, train_set, test_set = load_data(cfg)
    baseline = 10 * math.log10(4 / float(((test_set.x - train_set.x.mean(0)) ** 2).mean()))  # predict the mean digit
    assert psnr > baseline + 6, (psnr, baseline)  # at least 4x less squared error than the mean image
    enc = load_encoder(str(out))
    z = enc.encode(train_set.x)
    assert z.shape == (len(train_set), 2, 4, 4)
    assert abs(float(z.double().std()) - LATENT_STD) < 0.02  # a 4,096 subset sets it: the whole set agrees
    with torch.no_grad():
        direct = ae.F.decode(ae.F.encode(test_set.x[:8])[0])
    torch.testing.assert_close(enc.decode(enc.encode(test_set.x[:8])), direct, rtol=1e-4, atol=1e-5)
    assert "PSNR" in (out / "report.md").read_text()


def test_latent_run_trains_samples_and_evaluates_in_pixels(ae_run, tmp_path):
    ae, _ = ae_run
    lat = tmp_path / "lat"
    ok(run("train", "--data", "digits", "--steps", 40, "--out", lat, "--quiet", f"data.encoder={ae}",
           "model.base_channels=16", "model.channel_mult=[1,2]", "model.num_blocks=1", "train.batch_size=32",
           "log.n_samples=16"))
    assert "latents 2x4x4 of autoencoder" in (lat / "report.md").read_text()
    model, _, info = load_model(lat)
    assert info["shape"] == [2, 4, 4] and model.encoder.latent
    ok(run("sample", lat, "-n", 6, "--nfe", 10, "--sampler", "deis_pc", "--out", tmp_path / "s.png"))
    x = np.load(tmp_path / "s.npz")["x"]
    assert x.shape == (6, 1, 8, 8) and np.isfinite(x).all()
    r = ok(run("eval", lat, "-n", 64, "--nfe", 10, "--sampler", "deis_pc"))
    assert "FD (digits features)" in r.stdout and "bits/dim" not in r.stdout  # pixels measured; no latent likelihood
    one_line_error(run("edit", lat, "--input", "held-out", "--mask", "left", "-n", 2), "latent run",
                   "pixel-space")


def test_latent_errors_are_one_line(ae_run, tmp_path):
    ae, _ = ae_run
    one_line_error(run("train", "--data", "digits", "--steps", 2, "--out", tmp_path / "a", "--quiet",
                       f"data.encoder={ae}", "data.hflip=true"), "data.hflip", "latent")
    one_line_error(run("train-classifier", "--data", "digits", "--steps", 2, "--out", tmp_path / "b", "--quiet",
                       f"data.encoder={ae}"), "data.encoder", "classifier")
    one_line_error(run("train", "--data", "digits", "--steps", 2, "--out", tmp_path / "c", "--quiet",
                       f"data.encoder={tmp_path / 'nowhere'}"), "nowhere")
    one_line_error(run("train", "--data", "digits", "--steps", 2, "--out", tmp_path / "d", "--quiet",
                       f"data.encoder={tmp_path}"), "no complete checkpoint")
    one_line_error(run("train-autoencoder", "--data", "moons", "--steps", 2, "--out", tmp_path / "e", "--quiet"),
                   "(C, H, W) images")
