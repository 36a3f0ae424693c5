"""Training loop, EMA, exact resume, checkpoints, config parsing and the sample path."""

import importlib
import json
import math
import os
import signal
import time

import pytest
import torch

import diffspace.train as T
from diffspace import checkpoint as ckpt
from diffspace.analytic import ring8
from diffspace.evaluate import noise_floor, sliced_wasserstein
from diffspace.config import Config, SampleConfig, load_config, set_option
from diffspace.model import Diffusion, load_model
from diffspace.sampling import sample
from diffspace.train import ema_decay, learning_rate, power_ema_gamma, train
from diffspace.cli import main


def _config(**options) -> Config:
    cfg = Config()
    base = {"data.spec": "ring8", "data.n": 2000, "model.hidden": 32, "model.depth": 2, "train.steps": 12,
            "train.batch_size": 64, "train.warmup": 3, "log.checkpoint_every": 4, "log.every": 2, "log.keep": 10,
            "log.n_samples": 16, "sample.nfe": 5}
    for key, value in {**base, **options}.items():
        set_option(cfg, key, value)
    return cfg


def _final_tensors(run_dir):
    tensors, state = ckpt.load(ckpt.latest(run_dir / "checkpoints"))
    return tensors, state


# -- the 2-D quality bar ------------------------------------------------------------------------------
@pytest.mark.slow  # 19 s; the default suite trains the ring through the CLI and measures it (test_control_cli)
def test_short_training_on_the_ring_reaches_twice_the_noise_floor(tmp_path):
    """Issue 4: a short CPU training on a 2-D mixture gets within 2x the sliced-W2 noise floor."""
    cfg = _config(**{"model.hidden": 128, "model.depth": 3, "data.n": 10_000, "train.steps": 1000,
                     "train.batch_size": 256, "train.lr": 2e-3, "train.warmup": 100,
                     "log.checkpoint_every": 1000, "log.every": 100, "sample.nfe": 0})
    t0 = time.time()
    summary = train(cfg, tmp_path / "ring", progress=False)
    n = 2000
    x = sample(summary["ema"], n, SampleConfig(sampler="heun", nfe=35, seed=5)).x
    mixture = ring8()
    sw2 = sliced_wasserstein(x, mixture.sample(n, torch.Generator().manual_seed(6)))
    floor = noise_floor(mixture.sample, n)
    seconds = time.time() - t0
    assert sw2 <= 2 * floor, f"SW2 {sw2:.4f} vs floor {floor:.4f} after {seconds:.0f} s"  # its speed: benchmarks/


# -- exact resume -------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {},  # MLP on points, power EMA, constant LR after warm-up
    {"train.lr_min_ratio": 0.1, "train.ema": "fixed", "train.ema_decay": 0.9, "train.weight_decay": 0.01,
     "model.preset": "ddpm", "model.parameterization": "eps"},
    {"data.spec": "digits", "data.n": 300, "model.base_channels": 8, "model.channel_mult": [1], "model.num_blocks": 1,
     "model.class_conditional": True, "model.label_dropout": 0.5, "model.dropout": 0.1, "train.batch_size": 16},
    {"model.preset": "ddpm", "model.parameterization": "eps", "model.objective": "vlb", "model.noise": "importance"},
    {"train.phema": [0.05, 0.1], "log.phema_every": 4},
    {"data.spec": "digits", "data.n": 300, "model.base_channels": 8, "model.channel_mult": [1], "model.num_blocks": 1,
     "model.augment": 0.5, "model.uncertainty": True, "train.batch_size": 16},
], ids=["mlp-power-ema", "ddpm-eps-cosine-lr-fixed-ema", "unet-class-dropout", "vlb-importance-sampled-t", "phema-trackers",
        "unet-augmented-uncertainty"])
def test_resume_is_bit_identical(tmp_path, options):
    """N steps, stop, resume, N steps == 2N uninterrupted: model, EMA, optimizer and RNG states."""
    straight = tmp_path / "straight"
    train(_config(**options), straight, progress=False)
    split = tmp_path / "split"
    first = train(_config(**options), split, stop_at=6, progress=False)
    assert first["steps"] == 6 and _final_tensors(split)[1]["step"] == 6
    torch.manual_seed(12345)  # a resumed process starts from an unrelated global RNG state
    train(None, split, resume=True, progress=False)
    a, sa = _final_tensors(straight)
    b, sb = _final_tensors(split)
    assert sa["step"] == sb["step"] == 12
    assert a.keys() == b.keys()
    assert any(k.startswith("ema.") for k in a) and any(k.startswith("optimizer.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert sa["optimizer"] == sb["optimizer"]


def test_resume_extends_the_step_count_and_keeps_the_last_k(tmp_path):
    run = tmp_path / "run"
    train(_config(**{"log.keep": 2}), run, progress=False)
    train(None, run, resume=True, steps=20, progress=False)
    names = [p.name for p in ckpt.list_checkpoints(run / "checkpoints")]
    assert names == ["ckpt-00000016", "ckpt-00000020"]
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss") and [int(r.split(",")[0]) for r in rows[1:]] == list(range(2, 21, 2))
    for name in ("config.toml", "report.md", "loss.png", "samples/final.png"):
        assert (run / name).is_file(), name
    assert "ring8" in (run / "report.md").read_text()


def test_resume_errors(tmp_path):
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(None, tmp_path / "empty", resume=True, progress=False)
    run = tmp_path / "run"
    train(_config(), run, progress=False)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(_config(), run, progress=False)
    with pytest.raises(ValueError, match="own config"):
        train(_config(), run, resume=True, progress=False)
    with pytest.raises(ValueError, match="before the checkpoint"):
        train(None, run, resume=True, steps=5, progress=False)


# where a signal can land inside a step: the function patched, and which of its calls sends it
SIGNAL_POINTS = [("diffspace.model.Diffusion.loss", 3), ("torch.nn.utils.clip_grad_norm_", 5),
                 ("torch.optim.AdamW.step", 6), ("diffspace.train.ema_update", 7), ("diffspace.checkpoint.save", 2),
                 ("diffspace.data.batch_indices", 11)]


@pytest.mark.parametrize("target, call", SIGNAL_POINTS)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_anywhere_in_a_step_stops_exactly_and_resumes_bit_identically(tmp_path, monkeypatch, target, call, signum):
    """SIGINT / SIGTERM sent from inside the loss, after backward, inside the optimizer step, the EMA
    update, a checkpoint write or the batch draw: the step finishes, is saved, training stops with
    Interrupted (no traceback from the CLI), and resuming gives the straight run's tensors exactly."""
    module_name, _, attr = target.rpartition(".")
    if module_name.endswith(("Diffusion", "AdamW")):  # a method of a class
        mod, _, cls = module_name.rpartition(".")
        owner = getattr(importlib.import_module(mod), cls)
    else:
        owner = importlib.import_module(module_name)
    real, count = getattr(owner, attr), {"n": 0}

    def sending(*args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, sending)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # SIG_IGN in a shell's background job
    run = tmp_path / "run"
    with pytest.raises(T.Interrupted, match=f"stopped by {signum.name} at step"):
        train(_config(), run, progress=False)
    monkeypatch.setattr(owner, attr, real)
    stopped = _final_tensors(run)[1]["step"]
    assert 1 <= stopped < 12
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # the handlers are given back
    train(None, run, resume=True, progress=False)
    train(_config(), tmp_path / "straight", progress=False)
    a, b = _final_tensors(run)[0], _final_tensors(tmp_path / "straight")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps))  # no step logged twice


def test_a_second_signal_stops_at_once_and_discards_the_step(tmp_path, monkeypatch):
    real, count = T.ema_update, {"n": 0}

    def twice(*args):
        count["n"] += 1
        if count["n"] == 6:  # steps 1-4 are checkpointed (every 4); step 6 gets two signals
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(T, "ema_update", twice)
    run = tmp_path / "run"
    with pytest.raises(T.Interrupted, match="second SIGINT"):
        train(_config(), run, progress=False)
    assert _final_tensors(run)[1]["step"] == 4
    monkeypatch.setattr(T, "ema_update", real)
    train(None, run, resume=True, progress=False)
    train(_config(), tmp_path / "straight", progress=False)
    a, b = _final_tensors(run)[0], _final_tensors(tmp_path / "straight")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_cli_answers_an_interrupt_with_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    real = T.ema_update
    monkeypatch.setattr(T, "ema_update", lambda *a: (real(*a), os.kill(os.getpid(), signal.SIGINT) if a[2] >= 0 else None)[0])
    code = main(["train", "--data", "ring8", "--out", str(tmp_path / "r"), "--quiet", "--steps", "10", "model.hidden=16",
                 "model.depth=1", "data.n=300", "train.batch_size=32", "log.n_samples=4"])
    err = capsys.readouterr().err
    assert code == 130 and err.count("\n") == 1 and "stopped by SIGINT at step 1 of 10, saved" in err and "--resume" in err


def test_training_set_smaller_than_batch(tmp_path):
    with pytest.raises(ValueError, match=r"fewer than train.batch_size=64"):
        train(_config(**{"data.n": 50}), tmp_path / "run", progress=False)


# -- checkpoints --------------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_sample_from_it(tmp_path):
    run = tmp_path / "run"
    summary = train(_config(), run, progress=False)
    model, cfg, info = load_model(run)
    assert info["shape"] == [2] and cfg.to_dict() == summary["config"].to_dict()
    for (k, v), (k2, v2) in zip(summary["ema"].state_dict().items(), model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    a = sample(model, 32, SampleConfig(sampler="euler", nfe=6, seed=3)).x
    b = sample(summary["ema"], 32, SampleConfig(sampler="euler", nfe=6, seed=3)).x
    assert torch.equal(a, b) and torch.isfinite(a).all()
    same_from_file = load_model(ckpt.latest(run / "checkpoints").with_suffix(".safetensors"))[0]
    assert all(torch.equal(v, w) for v, w in zip(model.state_dict().values(), same_from_file.state_dict().values()))


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)}
    path = ckpt.save(tmp_path, 7, tensors, {"note": "x"})
    loaded, state = ckpt.load(path)
    assert state == {"note": "x", "step": 7, "sha256": ckpt.checksum(tensors)} and json.loads(path.read_text())["step"] == 7
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    with open(path.with_suffix(".safetensors"), "rb") as f:  # safetensors: 8-byte header length + JSON header
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
        assert header["a"]["shape"] == [2, 3] and header["__metadata__"] == {"step": "7", "sha256": state["sha256"]}


def test_sample_grids_every_k_steps_and_the_run_folder(tmp_path):
    cfg = _config(**{"log.sample_every": 4, "train.steps": 12})
    train(cfg, tmp_path / "r", progress=False)
    grids = sorted(p.name for p in (tmp_path / "r" / "samples").glob("*.png"))
    assert grids == ["final.png", "step-00000004.png", "step-00000008.png"]
    for name in ("config.toml", "metrics.csv", "report.md", "loss.png"):
        assert (tmp_path / "r" / name).is_file(), name
    rows = (tmp_path / "r" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,grad_norm,samples_per_s,seconds" and len(rows) == 1 + 12 // 2


def test_atomic_write_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "file.txt"
    ckpt.atomic_write_text(target, "old")

    def failing(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]  # no temporary left behind


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    ckpt.save(tmp_path, 1, {"a": torch.zeros(1)}, {})
    ckpt.save(tmp_path, 2, {"a": torch.ones(1)}, {})
    (tmp_path / "ckpt-00000002.json").unlink()  # crash between the tensors and the marker
    (tmp_path / "ckpt-00000003.safetensors").write_bytes(b"\0" * 10)
    assert ckpt.latest(tmp_path).name == "ckpt-00000001"
    with pytest.raises(ValueError, match="incomplete or missing"):
        ckpt.load(tmp_path / "ckpt-00000002")


# -- EMA, learning rate -------------------------------------------------------------------------------
def test_power_ema_gamma_matches_karras_2024():
    """sigma_rel = 0.05 and 0.10 give gamma = 16.97 and 6.94 (Karras et al. 2024, Section 3.1)."""
    assert power_ema_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert power_ema_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for bad in (0.0, 0.5, -1.0):
        with pytest.raises(ValueError, match="ema_sigma_rel"):
            power_ema_gamma(bad)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.2])
def test_power_ema_has_the_requested_relative_width(sigma_rel):
    """Averaging p_t = t/T and (t/T)^2 with the EMA gives the mean and second moment of its averaging
    profile over training time; its standard deviation (in units of the run length) is sigma_rel."""
    cfg = Config().train
    cfg.ema_sigma_rel = sigma_rel
    T = 20_000
    m1 = m2 = 0.0
    for step in range(1, T + 1):
        beta = ema_decay(cfg, step)
        m1 = beta * m1 + (1 - beta) * step / T
        m2 = beta * m2 + (1 - beta) * (step / T) ** 2
    assert math.sqrt(m2 - m1 ** 2) == pytest.approx(sigma_rel, rel=2e-3)


def test_fixed_ema_decay():
    cfg = Config().train
    cfg.ema, cfg.ema_decay = "fixed", 0.99
    assert ema_decay(cfg, 1) == 0.99 and ema_decay(cfg, 1000) == 0.99
    cfg.ema = "other"
    with pytest.raises(ValueError, match="train.ema='other'; allowed: power, fixed"):
        ema_decay(cfg, 1)


def test_learning_rate_warmup_and_cosine():
    cfg = Config().train
    cfg.lr, cfg.warmup, cfg.steps, cfg.lr_min_ratio = 1.0, 10, 110, 0.1
    assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate(cfg, 110) == pytest.approx(0.1)


def test_learning_rate_inverse_square_root_does_not_depend_on_the_run_length():
    """EDM2's decay (Karras et al. 2024), computed by hand: lr until t_ref, lr / 2 at 4 t_ref, lr / 10 at 100 t_ref."""
    cfg = Config().train
    cfg.lr, cfg.warmup, cfg.lr_schedule, cfg.lr_ref_steps = 1.0, 10, "inv-sqrt", 100
    for steps in (200, 10_000):
        cfg.steps = steps
        assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 100) == 1.0
        assert learning_rate(cfg, 400) == pytest.approx(0.5) and learning_rate(cfg, 10_000) == pytest.approx(0.1)
    cfg.lr_schedule = "linear"
    with pytest.raises(ValueError, match="train.lr_schedule='linear'; allowed: cosine, inv-sqrt"):
        learning_rate(cfg, 1)


# -- the model: every parameterization through one denoiser --------------------------------------------
@pytest.mark.parametrize("parameterization", ["precond", "x0", "eps", "score", "v", "flow", "energy"])
@pytest.mark.parametrize("preset", ["ddpm", "edm", "rectified-flow"])
def test_every_parameterization_trains_one_step(preset, parameterization):
    from diffspace.nn import MLP, Energy

    torch.manual_seed(0)
    net = MLP(2, hidden=16, depth=2)
    if parameterization == "energy":
        net = Energy(MLP(2, hidden=16, depth=2))
    from diffspace.presets import get_preset

    model = Diffusion(net, get_preset(preset), parameterization)
    x = torch.randn(32, 2)
    loss = model.loss(x, None, torch.Generator().manual_seed(1))
    assert loss.shape == (32,) and torch.isfinite(loss).all() and (loss >= 0).all()
    loss.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    out = model(torch.randn(4, 2), torch.full((4,), 1.0))
    assert out.shape == (4, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("preset, parameterization", [("ddpm", "eps"), ("ddpm", "v"), ("iddpm", "precond")])
def test_hybrid_objective_is_l_simple_plus_lambda_l_vlb(preset, parameterization):
    """Nichol & Dhariwal (2021, sec. 3.1): L_hybrid = L_simple + lambda L_vlb, F outputs 2C channels (the
    second half the log-variance interpolation v), and L_vlb reaches the variance only: the mean gets
    no gradient from it (stop-gradient)."""
    from diffspace import process as Q
    from diffspace.nn import MLP
    from diffspace.presets import get_preset

    torch.manual_seed(0)
    net = MLP(2, hidden=16, depth=2, out_dim=4)
    for p in net.parameters():  # a non-zero output, so both heads matter
        torch.nn.init.normal_(p, std=0.3)
    hybrid = Diffusion(net, get_preset(preset), parameterization, objective="hybrid", hybrid_lambda=0.5)
    plain = Diffusion(torch.nn.Identity(), get_preset(preset), parameterization)  # same weighting, no head
    plain.denoiser = hybrid.denoiser
    x = torch.randn(16, 2, dtype=torch.float64)
    net.double()
    t = torch.tensor([1, 2, 500, 1000] * 4, dtype=torch.float64) / 1000
    total = hybrid.loss(x, None, torch.Generator().manual_seed(1), t=t)
    simple = plain.loss(x, None, torch.Generator().manual_seed(1), t=t)
    # the L_vlb term by hand: z_t with the same eps, mean from x0_hat, Sigma from v, bits/dim times T
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    chain, i = hybrid.schedule, torch.round(t * 1000).long()
    z = chain.alpha(t)[:, None] * x + chain.sigma(t)[:, None] * eps
    with torch.no_grad():
        x0_hat = hybrid(z / chain.alpha(t)[:, None], chain.sigma_tilde(t))
        v = (hybrid.head.v + 1) / 2
    mean = Q.ddpm_posterior(x0_hat, z, i, chain)[0]
    nats = Q.vlb_term(x, z, i, mean, Q.learned_variance(v, i, chain), chain, decoder="gaussian")
    torch.testing.assert_close(total, simple + 0.5 * 1000 * nats / (2 * math.log(2)), rtol=1e-6, atol=1e-6)
    # stop-gradient: L_vlb's gradient reaches the v half of the output only
    out = []
    hook = net.out.register_forward_hook(lambda m, a, o: out.append(o) and None)
    grads = []
    for lam in (0.5, 0.0):
        hybrid.hybrid_lambda = lam
        grads += torch.autograd.grad(hybrid.loss(x, None, torch.Generator().manual_seed(1), t=t).sum(), out[-1])
    hook.remove()
    torch.testing.assert_close(grads[0][:, :2], grads[1][:, :2], rtol=1e-12, atol=1e-12)  # the mean's: L_simple's
    assert torch.all(grads[1][:, 2:] == 0) and torch.all(grads[0][:, 2:] != 0)  # v's: L_vlb's alone
    d, v = hybrid.denoise_with_variance(torch.randn(4, 2, dtype=torch.float64), torch.full((4,), 1.0, dtype=torch.float64))
    assert d.shape == v.shape == (4, 2)


def test_the_vlb_objective_is_the_bound_whose_weights_are_w_t():
    """objective='vlb' is T L_{i-1} in bits/dim (Ho et al. 2020, eq. 5). For i >= 2 and Sigma = beta,
    L_{i-1} = D (C_t + w_t mean (eps - eps_hat)^2) with C_t independent of the network, so between two
    networks its difference is T / ln 2 times that of the loss weighted by losses.vlb_weight; at i = 1
    it is the discretized decoder's -log p (17 levels), which the weighting cannot express."""
    from diffspace import process as Q
    from diffspace.nn import MLP
    from diffspace.presets import get_preset

    x = (torch.randint(0, 17, (8, 2)) / 8 - 1).double()
    t = torch.tensor([2, 3, 50, 1000] * 2, dtype=torch.float64) / 1000
    losses_by = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = MLP(2, hidden=16, depth=2).double()
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.3)
        for objective in ("vlb", "weighted"):
            model = Diffusion(net, get_preset("ddpm"), "eps", weighting="vlb", objective=objective, levels=17)
            losses_by[seed, objective] = model.loss(x, None, torch.Generator().manual_seed(2), t=t)
    T = 1000
    torch.testing.assert_close(losses_by[0, "vlb"] - losses_by[1, "vlb"],  # the weighted loss is summed in float32
                               T / math.log(2) * (losses_by[0, "weighted"] - losses_by[1, "weighted"]).double(), rtol=1e-5, atol=1e-3)
    # at i = 1: T times the decoder's -log p in bits/dim, by hand
    model = Diffusion(net, get_preset("ddpm"), "eps", objective="vlb", levels=17)
    one = torch.full((8,), 1 / T, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    chain = model.schedule
    z = chain.alpha(one)[:, None] * x + chain.sigma(one)[:, None] * eps
    x0_hat = model(z / chain.alpha(one)[:, None], chain.sigma_tilde(one))
    b1, b2 = chain.betas[0], chain.betas[1]
    tilde_2 = b2 * b1 / (1 - (1 - b1) * (1 - b2))  # Ho et al.'s code: beta~_2 = beta_2 (1 - abar_1) / (1 - abar_2) at t = 1
    nll = -Q.discretized_gaussian_log_likelihood(x, x0_hat, tilde_2, 17).sum(1)
    torch.testing.assert_close(model.loss(x, None, torch.Generator().manual_seed(2), t=one), T * nll / (2 * math.log(2)),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="objective='vlb' needs a discrete chain"):
        Diffusion(MLP(2), get_preset("edm"), objective="vlb")


def test_hybrid_needs_a_chain_and_samples_with_its_variance(tmp_path):
    from diffspace.nn import MLP
    from diffspace.presets import get_preset

    with pytest.raises(ValueError, match="objective='hybrid' needs a discrete chain"):
        Diffusion(MLP(2, out_dim=4), get_preset("edm"), objective="hybrid")
    with pytest.raises(ValueError, match="objective='nope'"):
        Diffusion(MLP(2), get_preset("ddpm"), objective="nope")
    cfg = _config(**{"model.preset": "ddpm", "model.parameterization": "eps", "model.objective": "hybrid",
                     "train.steps": 4, "sample.nfe": 4})
    summary = train(cfg, tmp_path / "hybrid", progress=False)
    model, _, _ = load_model(tmp_path / "hybrid")
    assert model.learned_variance and torch.equal(model(torch.ones(3, 2), torch.ones(3)), summary["ema"](torch.ones(3, 2), torch.ones(3)))
    x = sample(model, 16, SampleConfig(sampler="ddpm", nfe=10, seed=0)).x
    assert x.shape == (16, 2) and torch.isfinite(x).all()


def test_bad_parameterization():
    from diffspace.nn import MLP
    from diffspace.presets import get_preset

    with pytest.raises(ValueError, match="parameterization='z'.*allowed: precond, x0"):
        Diffusion(MLP(2), get_preset("edm"), "z")


# -- configuration --------------------------------------------------------------------------------
def test_config_toml_round_trip_and_overrides(tmp_path):
    cfg = _config(**{"model.channel_mult": [1, 2, 2], "train.bf16": True, "data.spec": 'a "quoted" name'})
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    again = load_config(path)
    assert again.to_dict() == cfg.to_dict()
    over = load_config(path, ["train.steps=7", "model.channel_mult=[1,4]", "train.bf16=false", "train.lr=1e-3"])
    assert over.train.steps == 7 and over.model.channel_mult == [1, 4] and over.train.bf16 is False
    assert over.train.lr == 1e-3


@pytest.mark.parametrize("override, message", [
    ("train.stepz=5", "unknown option 'train.stepz'; allowed: data.spec"),
    ("train.steps=five", "train.steps='five' is not a valid int"),
    ("train.bf16=maybe", "not a valid bool"),
    ("nodot", "must look like section.key=value"),
    ("bogus.x=1", "unknown option 'bogus.x'"),
])
def test_config_errors(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 1")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(bad)
    bad.write_text("[nonsense]\nx = 1")
    with pytest.raises(ValueError, match=r"unknown config section \[nonsense\]"):
        load_config(bad)
    bad.write_text("[train]\nsteps = 1.5")
    with pytest.raises(ValueError, match="train.steps=1.5 must be of type int"):
        load_config(bad)


CONFIGS = sorted(p for p in (__import__("pathlib").Path(__file__).parent.parent / "configs").glob("*.toml")
                 if not p.name.startswith("cifar10"))  # those read a local CIFAR-10 file: tests/test_cifar.py


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_train(tmp_path, path):
    cfg = load_config(path, ["train.steps=3", "log.n_samples=4", "sample.nfe=3", "train.warmup=1"])
    if cfg.sample.sampler == "langevin":  # 3 evaluations: one level of one step and the denoising step
        cfg.sample.options["n_steps"] = 1
    summary = train(cfg, tmp_path / "run", progress=False)
    assert summary["steps"] == 3 and (tmp_path / "run" / "samples" / "final.png").is_file()


def test_bf16_autocast_trains_close_to_float32(tmp_path):
    """train.bf16 runs the network under bfloat16 autocast: a different but close loss, finite weights."""
    losses_by = {}
    for bf16 in (False, True):
        cfg = _config(**{"train.bf16": bf16, "train.steps": 6, "log.every": 1})
        summary = train(cfg, tmp_path / f"bf16-{bf16}", progress=False)
        losses_by[bf16] = [float(r.split(",")[1]) for r in (tmp_path / f"bf16-{bf16}" / "metrics.csv").read_text().splitlines()[1:]]
        assert all(torch.isfinite(p).all() for p in summary["model"].parameters())
    assert losses_by[True] != losses_by[False]
    assert all(abs(a - b) < 0.05 * b for a, b in zip(losses_by[True], losses_by[False])), losses_by


def test_channels_last_trains_the_same_unet(tmp_path):
    """train.channels_last (NHWC batches and weights, for GPU convolutions) changes the memory layout
    only: the same losses and weights up to kernel rounding, and checkpoints with the same names."""
    runs = {}
    for nhwc in (False, True):
        cfg = _config(**{"data.spec": "digits", "data.n": 0, "model.base_channels": 8, "model.channel_mult": [1, 2], "model.num_blocks": 1,
                         "model.attention": [4], "train.channels_last": nhwc, "train.steps": 3, "train.batch_size": 16,
                         "log.every": 1, "log.n_samples": 2, "sample.nfe": 3})
        train(cfg, tmp_path / f"nhwc-{nhwc}", progress=False)
        runs[nhwc] = _final_tensors(tmp_path / f"nhwc-{nhwc}")[0]
    assert runs[True].keys() == runs[False].keys()
    for k in runs[False]:
        if k.startswith(("model.", "ema.")):
            torch.testing.assert_close(runs[True][k], runs[False][k], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_trains_the_same_model(tmp_path):
    """train.compile compiles F in place (about a minute on 2 CPU cores): same parameter names, and
    the same losses as eager up to kernel rounding."""
    runs = {}
    for compile_ in (False, True):
        cfg = _config(**{"train.compile": compile_, "train.steps": 4, "log.every": 1})
        train(cfg, tmp_path / f"c-{compile_}", progress=False)
        runs[compile_] = _final_tensors(tmp_path / f"c-{compile_}")[0]
    assert runs[True].keys() == runs[False].keys()
    for k in runs[False]:
        if k.startswith("model."):
            torch.testing.assert_close(runs[True][k], runs[False][k], rtol=1e-3, atol=1e-4)


def test_tensorboard_events_hold_what_metrics_csv_holds(tmp_path):
    """log.tensorboard writes the scalars of every metrics.csv row and the sample grids, read back here."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _config(**{"log.tensorboard": True, "log.every": 2, "log.sample_every": 4, "log.n_samples": 8})
    train(cfg, tmp_path / "run", progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    rows = [li.split(",") for li in (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]]
    for column, tag in ((1, "loss"), (2, "lr"), (3, "grad_norm")):
        logged = events.Scalars(f"train/{tag}")
        assert [e.step for e in logged] == [int(r[0]) for r in rows]
        for e, r in zip(logged, rows):
            assert e.value == pytest.approx(float(r[column]), rel=1e-5)
    assert sorted({e.step for e in events.Images("samples")}) == [4, 8, 12]  # every 4 steps, and the final grid


def test_tensorboard_missing_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name))
                        if name == "tensorboard" else real_import(name, *a, **k))
    assert main(["train", "--data", "ring8", "--steps", "2", "log.tensorboard=true", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "needs the tensorboard package" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_the_split_and_the_data_follow_data_seed_not_train_seed():
    from diffspace.train import load_data

    def split(**options):
        cfg = _config(**{"data.spec": "digits", "data.n": 0, **options})
        _, train_set, test_set = load_data(cfg)
        return train_set.x, test_set.x

    a, b = split(**{"train.seed": 0}), split(**{"train.seed": 7})
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # seed replicates see the same digits
    c = split(**{"data.seed": 7})
    assert not torch.equal(a[1], c[1]) and len(a[1]) == len(c[1])
    ring_a, ring_b = (load_data(_config(**{"train.seed": s}))[0].x for s in (0, 3))
    assert torch.equal(ring_a, ring_b)


def test_a_run_saved_before_data_seed_keeps_splitting_by_train_seed():
    saved = _config(**{"train.seed": 5}).to_dict()
    del saved["data"]["seed"]
    assert Config.from_saved(saved).data.seed == 5 and Config.from_dict(saved).data.seed == 0
    assert Config.from_saved(_config(**{"train.seed": 5}).to_dict()).data.seed == 0


@pytest.mark.parametrize("parameterization", ["precond", "eps"])
def test_uncertainty_weighting_is_part_of_the_model_and_trained(parameterization):
    """model.uncertainty: at the start the loss is the plain weighted loss (u = 0); its u gets a
    gradient, so the optimizer (over the model's parameters) trains it; the EMA copy carries it."""
    cfg = Config().model
    cfg.preset, cfg.parameterization, cfg.hidden, cfg.depth = "edm", parameterization, 32, 2
    torch.manual_seed(0)
    plain = Diffusion.from_config(cfg, (2,))
    cfg.uncertainty = True
    torch.manual_seed(0)
    model = Diffusion.from_config(cfg, (2,))
    x, t = torch.randn(64, 2), torch.rand(64) * 0.9 + 0.05
    eps = torch.randn(64, 2)
    assert torch.allclose(model.loss(x, None, t=t, eps=eps), plain.loss(x, None, t=t, eps=eps))
    model.loss(x, None, t=t, eps=eps).mean().backward()
    assert model.uncertainty.linear.weight.grad.abs().sum() > 0
    assert "uncertainty.linear.weight" in dict(model.named_parameters())
    cfg.objective = "vlb"
    cfg.preset = "ddpm"
    with pytest.raises(ValueError, match="uncertainty"):
        Diffusion.from_config(cfg, (2,))
