"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", sec. 3.2 and App. C): choose the EMA length after training.

A power-function EMA with exponent gamma, read at training time t, averages the weights theta(tau)
with the profile

    p_{gamma,t}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)   on 0 <= tau <= t   (0 after t),

and gamma follows from the relative width sigma_rel (train.power_ema_gamma, their eq. 3). Training
keeps a few such EMAs (train.phema, e.g. sigma_rel 0.05 and 0.10) and writes snapshots of them
every log.phema_every steps. Any other profile is then approximated by a combination of the
snapshots' profiles, sum_i x_i p_i, least squares in L2(tau): the normal equations A x = b with

    A_ij = <p_i, p_j>,  b_i = <p_i, p_target>,
    <p_{ga,ta}, p_{gb,tb}> = (ga + 1)(gb + 1) m^(ga + gb + 1) / ((ga + gb + 1) ta^(ga + 1) tb^(gb + 1)),  m = min(ta, tb),

and the same x combine the snapshots' weights: theta_target = sum_i x_i theta_i. The profiles are
scale-free in t, so times are divided by the largest before the powers are taken.
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def profile_dot(gamma_a: float, t_a: float, gamma_b: float, t_b: float) -> float:
    """<p_{gamma_a,t_a}, p_{gamma_b,t_b}>, the integral over tau of the two profiles' product."""
    m = min(t_a, t_b)
    return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
            * (m / t_a) ** (gamma_a + 1) * (m / t_b) ** (gamma_b + 1) / m)


def coefficients(snapshots: list[tuple[float, float]], target: tuple[float, float]) -> tuple[Tensor, float]:
    """(x, relative error) of the least-squares fit sum_i x_i p_i ~ p_target, for snapshots and
    target given as (gamma, t); the error is ||p_target - sum x_i p_i|| / ||p_target||."""
    scale = max(t for _, t in snapshots + [target])
    snaps = [(g, t / scale) for g, t in snapshots]
    goal = (target[0], target[1] / scale)
    A = torch.tensor([[profile_dot(*a, *b) for b in snaps] for a in snaps], dtype=torch.float64)
    b = torch.tensor([profile_dot(*a, *goal) for a in snaps], dtype=torch.float64)
    x = torch.linalg.lstsq(A, b[:, None], driver="gelsd").solution[:, 0]
    norm2 = profile_dot(*goal, *goal)
    residual2 = norm2 - 2 * float(x @ b) + float(x @ A @ x)
    return x, math.sqrt(max(residual2, 0.0) / norm2)


def combine(weights: list[dict[str, Tensor]], x: Tensor) -> dict[str, Tensor]:
    """sum_i x_i weights_i per tensor (floating tensors, in float64, back to their dtype); other
    tensors (integer buffers) from the newest snapshot."""
    out = {}
    for key, newest in weights[-1].items():
        if newest.is_floating_point():
            out[key] = sum(float(c) * w[key].double() for c, w in zip(x, weights)).to(newest.dtype)
        else:
            out[key] = newest
    return out


def reconstruct_run(run, sigma_rels: list[float], step: int | None = None) -> list[dict]:
    """EMA models of the given sigma_rel at training step `step` (default: the newest snapshot) from
    the snapshots in RUN/phema/ that a run with train.phema wrote, each saved as a checkpoint folder
    RUN/phema-<sigma_rel> that `sample` and `eval` read. Returns one dict per sigma_rel: sigma_rel,
    step, folder, snapshots used, the profile fit's relative error and the coefficients."""
    from pathlib import Path

    from . import checkpoint as ckpt
    from .train import power_ema_gamma

    run = Path(run)
    stems = ckpt.list_checkpoints(run / "phema")
    if not stems:
        raise ValueError(f"{run} has no post-hoc EMA snapshots (train it with train.phema=[0.05,0.1] log.phema_every=K)")
    found = ckpt.load_latest(run / "checkpoints")
    if found is None:
        raise ValueError(f"{run} holds no complete checkpoint (its config and data shape are read from one)")
    run_state = found[2]
    every = [ckpt.load(s) for s in stems]
    if step is None:
        step = every[-1][1]["step"]
    loaded = [(t, st) for t, st in every if st["step"] <= step]
    if not loaded:
        raise ValueError(f"--step={step}: the first snapshot of {run} is at step {every[0][1]['step']}")
    snapshots, weights = [], []
    for tensors, state in loaded:
        for j, sigma_rel in enumerate(state["sigma_rel"]):
            snapshots.append((power_ema_gamma(sigma_rel), float(state["step"])))
            weights.append({k[len(f"phema{j}."):]: v for k, v in tensors.items() if k.startswith(f"phema{j}.")})
    results = []
    for sigma_rel in sigma_rels:
        x, error = coefficients(snapshots, (power_ema_gamma(sigma_rel), float(step)))
        ema = {f"ema.{k}": v for k, v in combine(weights, x).items()}
        folder = run / f"phema-{sigma_rel:g}"
        keep = {"config": run_state["config"], "data": run_state["data"],
                "phema": {"sigma_rel": sigma_rel, "step": step, "snapshots": len(snapshots), "error": error}}
        for old in ckpt.list_checkpoints(folder):  # one model per folder: the latest reconstruction
            for suffix in (".json", ".safetensors"):
                old.with_suffix(suffix).unlink(missing_ok=True)
        ckpt.save(folder, step, ema, keep, keep=1)
        results.append({"sigma_rel": sigma_rel, "step": step, "folder": folder, "snapshots": len(snapshots),
                        "error": error, "coefficients": x.tolist()})
    return results
