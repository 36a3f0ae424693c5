"""torch.distributed under torchrun, in a few functions (gloo on CPU, NCCL on CUDA).

`torchrun --nproc_per_node N -m diffspace train ...` sets RANK, WORLD_SIZE and LOCAL_RANK; `init`
then joins the process group. Without torchrun (WORLD_SIZE unset or 1) every function here is the
one-process identity, so the training loop and sampling read the same either way.

What the loop does with it (train.py): every rank computes the global batch's indices and draws its
noise (model.Draw) from the same generator, takes its rows (`shard`), and DistributedDataParallel
averages the gradients; the per-sample losses are gathered (`gather`) for the log and the
importance sampler; rank 0 alone writes. Sampling splits its seeded chunks across ranks
(`sampling.sample`).
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def requested() -> bool:
    """Launched by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_HOST = {"group": None}  # the group of the host-side agreements below (`most`, `any_rank`, ...)


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (once); NCCL for CUDA devices, gloo otherwise.
    Under NCCL a second, gloo group carries the small host-side agreements (the stop flag each step,
    counts): on the GPU's group each would be a device tensor read back, a synchronisation per step."""
    if requested() and not dist.is_initialized():
        timeout = datetime.timedelta(minutes=10)
        if device.type == "cuda":
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
            _HOST["group"] = dist.new_group(backend="gloo", timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (from torchrun's RANK before the group is joined)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", "0")) if requested() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(name: str) -> str:
    """train.device under torchrun: 'auto' or 'cuda' become this process's GPU, cuda:LOCAL_RANK."""
    if requested() and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name


def shard(n: int) -> slice:
    """This rank's rows of a global batch of n (n divisible by the world size, checked by the caller)."""
    size = n // world_size()
    return slice(rank() * size, (rank() + 1) * size)


def gather(x: Tensor) -> Tensor:
    """The ranks' equal-sized x, concatenated along dim 0 in rank order (x itself in one process)."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def gather_chunks(mine: list[Tensor], count: int, size: int, n: int, empty: Tensor) -> list[Tensor]:
    """All `count` chunks of n rows in order, on every rank, where rank r computed chunks r, r + W, ...
    (`mine`: `size` rows each but the last, n - (count - 1) size). Each round of W chunks travels in
    one all_gather, padded to `size` rows like `empty` (shape (0, *row), the dtype and device)."""
    if not active():
        return mine
    W, out = world_size(), []
    for j in range(-(-count // W)):
        buf = empty.new_zeros((size, *empty.shape[1:]))
        if j < len(mine):
            buf[:len(mine[j])] = mine[j]
        parts = [torch.empty_like(buf) for _ in range(W)]
        dist.all_gather(parts, buf)
        out += [got[:min(n, (k + 1) * size) - k * size] for k, got in enumerate(parts, start=j * W) if k < count]
    return out


def most(value: int) -> int:
    """The largest of the ranks' integers."""
    if not active():
        return value
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_HOST["group"])
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if flag is True on any (e.g. a signal that reached only some)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_HOST["group"])
    return bool(t.item())


def same_on_all_ranks(value: int, what: str) -> None:
    """ValueError unless every rank holds the same integer (e.g. the step it resumes from)."""
    if not active():
        return
    t = torch.tensor([value, -value])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_HOST["group"])
    if int(t[0]) != -int(t[1]):
        raise ValueError(f"the ranks disagree on {what}: from {int(t[0])} to {-int(t[1])}")


def barrier() -> None:
    if active():
        dist.barrier()


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _HOST["group"] = None
