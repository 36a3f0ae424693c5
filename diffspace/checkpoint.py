"""Checkpoints: tensors in safetensors, everything else in JSON, both written atomically.

A checkpoint `ckpt-{step:08d}` is two files in the run's `checkpoints/` folder:

    ckpt-00001000.safetensors   model, EMA and optimizer tensors, RNG states (as uint8 tensors)
    ckpt-00001000.json          step, config, optimizer hyper-parameters, names of the RNG states

Each file is written to a temporary name in the same folder, flushed and fsync'ed, then renamed
over the final name (atomic on POSIX), and the folder is fsync'ed. The JSON file is written last:
a checkpoint counts only once its JSON exists, so a crash mid-write never leaves a half checkpoint
that `latest` would pick (and a failed JSON write removes its safetensors). Nothing is ever
unpickled: safetensors holds raw tensors, JSON holds text.

Both files carry the step and a SHA-256 of the tensors (names, dtypes, shapes and bytes): `load`
verifies them and raises Damaged naming the file on any mismatch, a truncated or unreadable file
included; `load_latest` falls back to the newest checkpoint that verifies and says so. A run folder
is written by one process at a time (`RunLock`, an OS-level lock released when the process dies).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
    digest = checksum(flat)
    def write(tmp):
        try:
            save_file(flat, tmp, metadata={"step": str(step), "sha256": digest})
        except Exception as e:  # safetensors reports a full disk as its own error type
            text = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise OSError(errno.ENOSPC if "No space" in text else errno.EIO, text, str(folder / f"{name}.safetensors")) from None

    atomic_write(folder / f"{name}.safetensors", write)
    try:
        atomic_write_text(folder / f"{name}.json", json.dumps(dict(state, step=step, sha256=digest), indent=1, sort_keys=True))
    except BaseException:  # no orphan tensors file (it would only fill the disk)
        (folder / f"{name}.safetensors").unlink(missing_ok=True)
        raise
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


class Damaged(ValueError):
    """A checkpoint whose files cannot be read or do not match (step, checksum)."""


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state) of a checkpoint given as its .json, its .safetensors or its stem, verified:
    Damaged if either file cannot be read, or the steps or checksums of the two files and of the
    tensors disagree (checkpoints written before checksums existed are read unverified)."""
    stem = Path(path)
    if stem.suffix in (".json", ".safetensors"):
        stem = stem.with_suffix("")
    js, st = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not js.exists() or not st.exists():
        raise ValueError(f"checkpoint {stem} is incomplete or missing: need both {js.name} and {st.name}")
    try:
        state = json.loads(js.read_text())
        step = state["step"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise Damaged(f"checkpoint {js} is damaged: not the JSON of a checkpoint ({type(e).__name__})") from None
    try:
        with safe_open(str(st), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own errors: truncated, empty, a damaged header
        raise Damaged(f"checkpoint {st} is damaged: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if "sha256" in state or meta:
        if meta.get("step") != str(step):
            raise Damaged(f"checkpoint {stem}: its files disagree on the step ({js.name}: {step}, {st.name}: {meta.get('step')})")
        if not (state.get("sha256") == meta.get("sha256") == checksum(tensors)):
            raise Damaged(f"checkpoint {st} is damaged: its tensors do not match their checksum")
    return tensors, state


def load_latest(folder: Path) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """(stem, tensors, state) of the newest checkpoint in `folder` that verifies (load), saying on
    stderr which damaged ones it passed over; None if there is none; Damaged if none verifies."""
    errors = []
    for stem in reversed(list_checkpoints(folder)):
        try:
            tensors, state = load(stem)
        except Damaged as e:
            errors.append(str(e))
            continue
        for e in errors:
            print(f"diffspace: {e}; using the older {stem.name}", file=sys.stderr)
        return stem, tensors, state
    if errors:
        raise Damaged(f"no checkpoint in {folder} verifies; the newest: {errors[0]}")
    return None


def remove_stray_files(folder: Path) -> list[Path]:
    """Delete the temporary files (.*.tmp) a killed writer left in `folder`; call only as its one writer."""
    stray = list(Path(folder).glob(".*.tmp")) if Path(folder).is_dir() else []
    for p in stray:
        p.unlink(missing_ok=True)
    return stray


class RunLock:
    """An exclusive OS-level lock (flock) on folder/.lock while a process writes the run; the OS
    releases it when the process dies. A second writer gets ValueError at once. Readers do not lock.
    Where flock does not exist (Windows) it does nothing."""

    def __init__(self, folder: Path):
        self.path, self.file, self.created = Path(folder) / ".lock", None, False

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            raise ValueError(f"{self.path.parent} is being written by {holder}; wait for it to finish or choose another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()}")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is None:
            return
        folder = self.path.parent
        if self.created and [p.name for p in folder.iterdir()] == [".lock"]:  # refused before any work: leave nothing
            self.path.unlink()
            folder.rmdir()
        self.file.truncate(0)  # no holder named any more
        self.file.close()  # closing releases the lock


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
    """Load the tensors under `prefix.` into module; ValueError naming what does not fit otherwise."""
    own = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    expected = module.state_dict()
    missing, extra = sorted(set(expected) - set(own)), sorted(set(own) - set(expected))
    shapes = [f"{k}: {tuple(own[k].shape)} saved, {tuple(v.shape)} here" for k, v in expected.items()
              if k in own and own[k].shape != v.shape]
    if missing or extra or shapes:
        parts = ([f"{len(shapes)} shapes differ ({shapes[0]})"] if shapes else []) + \
                ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []) + ([f"{len(extra)} unexpected (e.g. {extra[0]})"] if extra else [])
        raise ValueError(f"the checkpoint's {prefix} tensors do not fit this network: {'; '.join(parts)}; "
                         "its [model] settings (e.g. hidden, depth, base_channels, channel_mult) or data shape differ")
    module.load_state_dict(own, strict=True)
