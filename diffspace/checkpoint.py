"""Checkpoints: tensors in safetensors, everything else in JSON, both written atomically.

A checkpoint `ckpt-{step:08d}` is two files in the run's `checkpoints/` folder:

    ckpt-00001000.safetensors   model, EMA and optimizer tensors, RNG states (as uint8 tensors)
    ckpt-00001000.json          step, config, optimizer hyper-parameters, names of the RNG states

Each file is written to a temporary name in the same folder, flushed and fsync'ed, then renamed
over the final name (atomic on POSIX), and the folder is fsync'ed. The JSON file is written last:
a checkpoint counts only once its JSON exists, so a crash mid-write never leaves a half checkpoint
that `latest` would pick. Nothing is ever unpickled: safetensors holds raw tensors, JSON holds text.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "ckpt-"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync the result, rename it to `path` and fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save(folder: Path, step: int, tensors: dict[str, torch.Tensor], state: dict, keep: int = 3) -> Path:
    """Write checkpoint `step` (tensors + JSON state) and delete all but the newest `keep`."""
    folder = Path(folder)
    name = f"{PREFIX}{step:08d}"
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    bad = non_finite(flat)
    if bad:
        raise ValueError(f"not writing checkpoint {name}: {len(bad)} tensors hold NaN or inf ({', '.join(bad[:3])}"
                         f"{', ...' if len(bad) > 3 else ''}); the older checkpoints are kept")
    atomic_write(folder / f"{name}.safetensors", lambda tmp: save_file(flat, tmp))
    atomic_write_text(folder / f"{name}.json", json.dumps(dict(state, step=step), indent=1, sort_keys=True))
    if keep > 0:
        for old in list_checkpoints(folder)[:-keep]:
            old.with_suffix(".json").unlink(missing_ok=True)  # the marker first
            old.with_suffix(".safetensors").unlink(missing_ok=True)
    return folder / f"{name}.json"


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold NaN or inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (JSON + safetensors present), oldest first, as paths without suffix."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    done = [p.with_suffix("") for p in folder.glob(f"{PREFIX}*.json") if p.with_suffix(".safetensors").exists()]
    return sorted(done, key=lambda p: p.name)


def latest(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint given as its .json, its .safetensors or its stem."""
    stem = Path(path)
    if stem.suffix in (".json", ".safetensors"):
        stem = stem.with_suffix("")
    js, st = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not js.exists() or not st.exists():
        raise ValueError(f"checkpoint {stem} is incomplete or missing: need both {js.name} and {st.name}")
    return load_file(str(st)), json.loads(js.read_text())


# -- torch objects <-> flat tensors --------------------------------------------------------------------
def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str = "optimizer") -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer's state_dict into tensors (for safetensors) and JSON-able hyper-parameters."""
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{prefix}.{pid}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str = "optimizer") -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def module_tensors(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    own = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    module.load_state_dict(own, strict=True)
