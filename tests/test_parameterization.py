"""Parameterization conversions against the definitions, autograd scores and the lecture's table."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffspace import parameterization as P
from diffspace import schedules as S

SCHEDULES = [S.ddpm_linear(), S.VPSDE(), S.Cosine(), S.VE(), S.EDM(), S.SqrtVE(), S.RectifiedFlow()]


def draw(schedule, B=6, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    eps = torch.randn(B, D, generator=g, dtype=torch.float64)
    u = torch.linspace(0.1, 0.9, B, dtype=torch.float64)
    t = 0.05 + 20 * u if schedule.t_max == math.inf else u
    a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    return x, eps, t, a * x + s * eps


def definitions(x, eps, t, schedule):
    """Each parameterization's target, typed from its definition (independent of the module)."""
    a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    da, ds = schedule.dalpha(t)[:, None], schedule.dsigma(t)[:, None]
    return {
        "x0": x,
        "eps": eps,
        "score": -eps / s,  # grad log N(z; a x, s^2) = -(z - a x) / s^2
        "energy": eps / s,
        "v": a * eps - s * x,
        "flow": da * x + ds * eps,
    }


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
@pytest.mark.parametrize("src", P.PARAMETERIZATIONS)
@pytest.mark.parametrize("dst", P.PARAMETERIZATIONS)
def test_every_pair_maps_true_target_to_true_target_and_round_trips(schedule, src, dst):
    x, eps, t, z = draw(schedule)
    true = definitions(x, eps, t, schedule)
    out = P.convert(true[src], src, dst, z, t, schedule)
    torch.testing.assert_close(out, true[dst], rtol=1e-10, atol=1e-10 * true[dst].abs().max().item())
    # round trip on an arbitrary (not self-consistent) prediction
    pred = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    back = P.convert(P.convert(pred, src, dst, z, t, schedule), dst, src, z, t, schedule)
    rel = ((back - pred).norm() / pred.norm()).item()
    assert rel < 1e-10, rel


@pytest.mark.parametrize("schedule", SCHEDULES, ids=repr)
def test_score_is_autograd_of_the_conditional_log_density(schedule):
    x, eps, t, z = draw(schedule)
    a, s = schedule.alpha(t)[:, None], schedule.sigma(t)[:, None]
    zz = z.clone().requires_grad_(True)
    logq = (-0.5 * ((zz - a * x) / s) ** 2).sum()
    (grad,) = torch.autograd.grad(logq, zz)
    torch.testing.assert_close(P.convert(eps, "eps", "score", z, t, schedule), grad, rtol=1e-12, atol=1e-12)
    # energy network E = ||z - a x||^2 / (2 s^2): its negative gradient is the same score
    energy = lambda zz, tt: ((zz - a * x) ** 2 / (2 * s**2)).sum(dim=1)
    torch.testing.assert_close(P.score_from_energy(energy, z, t), grad, rtol=1e-12, atol=1e-12)


def test_lecture_table_vp_rows():
    """The slide's conversion table, for a VP schedule (alpha^2 + sigma^2 = 1), typed from the slide."""
    sch = S.Cosine()
    x, eps, t, z = draw(sch)
    a, s = sch.alpha(t)[:, None], sch.sigma(t)[:, None]
    d = definitions(x, eps, t, sch)
    v, sc = d["v"], d["score"]
    torch.testing.assert_close(a * z - s * v, x)  # x0 from v
    torch.testing.assert_close(s * z + a * v, eps)  # eps from v
    # score from v: the slide prints (-sigma z + alpha v) / sigma; the correct entry is -(sigma z + alpha v) / sigma
    torch.testing.assert_close(-(s * z + a * v) / s, sc)
    assert not torch.allclose((-s * z + a * v) / s, sc)
    torch.testing.assert_close((a * z - x) / s, v)  # v from x0
    torch.testing.assert_close((eps - s * z) / a, v)  # v from eps
    torch.testing.assert_close((z + s**2 * sc) / a, x)  # x0 from score
    torch.testing.assert_close((a * x - z) / s**2, sc)  # score from x0
    for name, expect in [("x0", x), ("eps", eps), ("v", v), ("score", sc)]:
        torch.testing.assert_close(P.convert(v, "v", name, z, t, sch), expect)


def test_lecture_table_rectified_flow_rows():
    """For alpha = 1 - t, sigma = t the flow velocity is u = eps - x (slide: x0 = z - sigma u, eps = alpha u + z)."""
    sch = S.RectifiedFlow()
    x, eps, t, z = draw(sch)
    a, s = sch.alpha(t)[:, None], sch.sigma(t)[:, None]
    u = eps - x
    torch.testing.assert_close(P.convert(x, "x0", "flow", z, t, sch), u)
    torch.testing.assert_close(z - s * u, x)
    torch.testing.assert_close(a * u + z, eps)
    torch.testing.assert_close(P.convert(u, "flow", "x0", z, t, sch), z - s * u)
    torch.testing.assert_close(P.convert(u, "flow", "eps", z, t, sch), a * u + z)
    torch.testing.assert_close((z - x) / s, u)  # slide: flow from x0


def test_unknown_parameterization():
    sch = S.EDM()
    x, eps, t, z = draw(sch)
    with pytest.raises(ValueError, match=r"unknown parameterization 'noise'.*allowed: x0, eps"):
        P.convert(x, "noise", "x0", z, t, sch)
    with pytest.raises(ValueError, match="unknown parameterization 'velocity'"):
        P.target("velocity", x, eps, t, sch)


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(S.SCHEDULES)),
    src=st.sampled_from(P.PARAMETERIZATIONS),
    dst=st.sampled_from(P.PARAMETERIZATIONS),
    shape=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    scalar_t=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_conversion_shapes_broadcasting_dtypes(name, src, dst, shape, dtype, scalar_t, seed):
    sch = S.get_schedule(name)
    g = torch.Generator().manual_seed(seed)
    B = 3
    z = torch.randn([B] + shape, generator=g).to(dtype)
    pred = torch.randn([B] + shape, generator=g).to(dtype)
    scale = 10.0 if sch.t_max == math.inf else 0.8
    t = (0.1 + scale * torch.rand(() if scalar_t else (B,), generator=g)).to(dtype)
    out = P.convert(pred, src, dst, z, t, sch)
    assert out.shape == z.shape and out.dtype == dtype
    back = P.convert(out, dst, src, z, t, sch)
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    assert ((back - pred).norm() / pred.norm()).item() < tol
    # per-sample t gives the same answer as converting each sample alone
    if not scalar_t:
        one = P.convert(pred[1:2], src, dst, z[1:2], t[1:2], sch)
        torch.testing.assert_close(one, out[1:2], rtol=tol, atol=tol)
