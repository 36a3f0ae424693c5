"""The noise of the training loss and its pairing with the data.

Every loss draws eps ~ N(0, I) for its data x and trains on z_t = alpha_t x + sigma_t eps. Two choices
change that draw without changing the model:

* offset noise (Guttenberg 2023, crosslabs blog 'Diffusion with offset noise'): eps + s n with n one
  N(0, 1) value per sample and channel, shared by every value of the channel. Plain eps moves the
  mean of a channel of H W values only by N(0, 1 / (H W)), so a model learns to keep each channel's
  mean and cannot make a much darker or brighter image than its start; the offset lets it learn
  to change it. Sampling is unchanged (it starts from sigma_max N(0, I), as in the post);
* the coupling of the pairs (x_i, eps_j) in a batch: 'independent' (the usual iid pairing) or 'ot', the
  exact minibatch optimal-transport assignment (Tong et al. 2023, OT-CFM; Pooladian et al. 2023),
  which shortens and uncrosses the straight paths x -> eps that flow matching regresses on.

A permutation of iid noise is iid noise again, so the coupling leaves the noise marginal as drawn
(N(0, I), or the offset law); only which eps goes with which x changes (labels stay with x). The
pairing does not depend on the preset, but it is meant for flow matching (the rectified-flow preset),
whose paths are the straight lines it shortens.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

COUPLINGS = ("independent", "ot")


def offset_noise_shape(shape: tuple) -> tuple:
    """The shape of the offset n for data of batch shape `shape`: (B, C, 1, 1) for images (one value per
    sample and channel, shared by its pixels); (B, 1) for points, whose d coordinates are one channel
    of d values (as image64's 64 pixels are). A separate offset per coordinate would only be more iid
    noise, eps ~ N(0, (1 + s^2) I), not an offset."""
    return (shape[0], shape[1], *([1] * (len(shape) - 2))) if len(shape) > 2 else (shape[0], 1)


def draw_noise(x: Tensor, generator: torch.Generator, coupling: str = "independent",
               offset_noise: float = 0.0) -> Tensor:
    """The loss's eps for the batch x: eps ~ N(0, I), plus offset noise s n (Guttenberg 2023), so that

        Cov(eps) = I + s^2 [same sample, same channel],

    then, for coupling 'ot', permuted to the exact minibatch OT pairing with x (`ot_permutation`)."""
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    if offset_noise:
        n = torch.randn(offset_noise_shape(tuple(x.shape)), generator=generator, dtype=x.dtype, device=x.device)
        eps = eps + offset_noise * n
    if coupling == "ot":
        eps = eps[ot_permutation(x, eps).to(x.device)]
    return eps


def ot_permutation(x: Tensor, eps: Tensor) -> Tensor:
    """The permutation pi that minimises sum_i ||x_i - eps_pi(i)||^2 over all B! pairings of a batch.

    Between two empirical measures of B equally weighted points the optimal transport plan is a
    permutation matrix (Birkhoff-von Neumann: the linear program's vertices), so the exact minibatch OT
    of OT-CFM (Tong et al. 2023, who solve it exactly with POT's network simplex) is this assignment
    problem, solved exactly by scipy's linear_sum_assignment (Crouse 2016, a shortest augmenting path
    Jonker-Volgenant method). An entropic (Sinkhorn) plan would instead blur the pairing. Cost per
    batch: the B x B squared distances, O(B^2 d) in float64 on the CPU (one device-to-host copy), and
    the assignment, O(B^3) worst case; measured 6-30 ms for B = 256 on a 2-core CPU shared with other
    jobs, which made the ring8 runs of benchmarks/flow_coupling.py 2.3x as long as without it."""
    from scipy.optimize import linear_sum_assignment

    a = x.detach().reshape(len(x), -1).double().cpu().numpy()
    b = eps.detach().reshape(len(eps), -1).double().cpu().numpy()
    cost = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T  # ||a_i - b_j||^2
    _, cols = linear_sum_assignment(cost)  # rows come back as 0..B-1
    return torch.from_numpy(cols).long()
