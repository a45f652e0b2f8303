"""Atomic, verified checkpoints, and the lock that gives a run folder to one command at a time.

A checkpoint is a folder `checkpoints/step_XXXXXXX/` holding `weights.safetensors` (every network, prefixed by role),
`state.pt` (optimisers, RNG, counters; read back with weights_only=True) and `manifest.json` (the step and the
SHA-256 of each file). It is written under a temporary name and renamed only when complete, so a crash leaves
either the whole checkpoint or none; re-saving a step moves the old copy aside (`.old_step_XXXXXXX`, still loadable)
until the new one is in place. On load the hashes are checked and a damaged checkpoint (a bad hash, a manifest entry
that is not one of its own files, a state.pt that does not unpickle, non-finite weights) is skipped, never used.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import InputError, MissingFileError, RunFolderError  # noqa: F401  (re-exported for callers of train.state)
from ..hashing import file_sha256

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, run folders are not locked
    fcntl = None

FILES = ("weights.safetensors", "state.pt")


@contextmanager
def run_lock(folder: Path):
    """Hold `folder` for this process: a second command on it fails at once, naming the holder. The lock is the
    kernel's (flock on folder/.lock), so it dies with its process: a killed run never leaves a folder blocked."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / ".lock", "a+")
    except OSError as e:
        raise RunFolderError(f"cannot write to the run folder {folder} ({e.strerror}): choose a writable --outdir") \
            from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise RunFolderError(f"{folder} is in use by another stepdistill command (pid {holder}); wait for it "
                                     "to finish or stop it, or choose another --outdir") from None
            except OSError as e:  # a filesystem without locks (some network mounts): run unlocked, and say so
                warnings.warn(f"{folder} cannot be locked ({e.strerror}): make sure no other command uses it",
                              stacklevel=3)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock; the file stays (removing it would race with a command opening it)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def save_checkpoint(folder: Path, step: int, weights: dict[str, torch.Tensor], state: dict, keep: int = 2) -> Path:
    """Write checkpoint `step` atomically into `folder`, then prune all but the newest `keep`."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{step:07d}"
    tmp, old = folder / f".tmp_{final.name}", folder / f".old_{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / FILES[0])
        torch.save(state, tmp / FILES[1])
        manifest = {"step": step, "sha256": {name: file_sha256(tmp / name) for name in FILES}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        for name in (*FILES, "manifest.json"):  # make the bytes durable before the rename publishes them
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            need = _nbytes(weights) + _nbytes(state)
            raise RunFolderError(f"no space left on the device of {folder}: a checkpoint needs about "
                                 f"{need / 2**20:.1f} MiB; free space and rerun the same command (it resumes from the "
                                 "newest checkpoint)") from None
        raise
    if final.exists():  # re-saving a step: the old copy stays loadable until the new one is in place
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(folder)
    shutil.rmtree(old, ignore_errors=True)
    for stale in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("_", 1)[1])


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint folders (with a manifest), oldest first; a step's old copy (`.old_step_*`) stands in for it
    while a crashed re-save left no new one."""
    if not folder.exists():
        return []
    found = {p.name: p for p in folder.glob("step_*") if (p / "manifest.json").exists() and p.name[5:].isdigit()}
    for p in folder.glob(".old_step_*"):
        if p.name[10:].isdigit() and p.name[5:] not in found and (p / "manifest.json").exists():
            found[p.name[5:]] = p
    return sorted(found.values(), key=_step_of)


def verify(path: Path) -> str | None:
    """None if the checkpoint is intact, else a sentence saying what is wrong."""
    if path.is_symlink():
        return "it is a symbolic link (a checkpoint is a folder of its run)"
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    hashes = manifest.get("sha256") if isinstance(manifest, dict) else None
    if not isinstance(hashes, dict) or sorted(hashes) != sorted(FILES) or manifest.get("step") != _step_of(path):
        return f"its manifest does not list step {_step_of(path)}'s files {', '.join(FILES)}"
    for name, digest in hashes.items():
        file = path / name
        if file.is_symlink() or not file.is_file():
            return f"{name} is missing or not a regular file"
        if file_sha256(file) != digest:
            return f"{name} does not match its recorded SHA-256 (truncated or modified)"
    return None


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, state) of a verified checkpoint; raises InputError when they cannot be used."""
    try:
        weights = load_file(path / FILES[0])
        state = torch.load(path / FILES[1], weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 (unpickling raises many kinds)
        raise InputError(f"it does not load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None
    bad = non_finite(weights)
    if bad:
        raise InputError(f"{len(bad)} weight tensors hold non-finite values (e.g. {bad[0]})")
    return weights, state


def non_finite(weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinity."""
    return [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_step(folders: list[Path], step: int) -> tuple[int, dict[str, torch.Tensor], dict]:
    """(step, weights, state) of the checkpoint of iteration `step` in the first of these folders that holds one;
    MissingFileError naming the iterations there are, InputError when it is damaged."""
    have = {_step_of(p): p for folder in reversed(folders) for p in list_checkpoints(folder)}
    if step not in have:
        listed = ", ".join(map(str, sorted(have))) or "none"
        raise MissingFileError(f"no checkpoint of iteration {step} in {' or '.join(map(str, folders))} (there are: "
                               f"{listed}; train.keep_checkpoints keeps the newest few)")
    try:
        return _open(have[step])
    except InputError as e:
        raise InputError(f"checkpoint {have[step]} is damaged: {e}") from None


def _open(path: Path) -> tuple[int, dict[str, torch.Tensor], dict]:
    """(step, weights, state) of one checkpoint; InputError saying what is wrong when it is damaged."""
    problem = verify(path)
    if problem is not None:
        raise InputError(problem)
    return _step_of(path), *_load(path)


def load_latest(folder: Path) -> tuple[int, dict[str, torch.Tensor], dict] | None:
    """(step, weights, state) of the newest intact checkpoint, or None. Damaged ones are reported and skipped."""
    if folder.exists():
        for p in sorted(folder.glob("step_*")):
            if not (p / "manifest.json").exists():
                warnings.warn(f"skipping {p}: it has no manifest.json (not a complete checkpoint)", stacklevel=2)
    for path in reversed(list_checkpoints(folder)):
        try:
            return _open(path)
        except ValueError as e:
            warnings.warn(f"skipping damaged checkpoint {path}: {e}", stacklevel=2)
    return None


def prefixed(prefix: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in state_dict.items()}


def unprefixed(prefix: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in weights.items() if k.startswith(prefix + ".")}
