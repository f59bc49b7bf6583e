"""Atomic, verified checkpoints: ``checkpoints/step_XXXXXXXX/`` with model weights (safetensors), trainer
state (optimizer, schedules, RNG, step, counters) and a manifest of SHA-256 checksums written last.

A checkpoint directory is written under a temporary name, fsynced and renamed; the ``latest`` pointer is
replaced after it. Loading verifies the checksums and falls back to the previous good checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the run's config."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step_*") if p.is_dir()), key=lambda p: p.name)


class _StateDictView:
    """A state dict in the place of a module for ``save_model``, which only calls ``state_dict()``: a gathered
    state dict is then written exactly as a single-process model's (same tied-tensor handling)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.state)


def save_checkpoint(
    root: Path,
    step: int,
    model: torch.nn.Module,
    trainer_state: dict[str, Any],
    keep: int,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and keep the newest ``keep`` complete ones.

    ``weights``: the full state dict to write instead of ``model``'s own (a sharded run passes its experts
    gathered by global id), so the file is the same whatever the parallel layout.
    """
    named = weights.items() if weights is not None else model.named_parameters()
    for name, p in named:
        if not torch.isfinite(p).all():
            raise CheckpointError(
                f"refusing to write a checkpoint with non-finite weights ({name}) at step {step}"
            )
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    try:
        _write_checkpoint_dir(tmp, final, step, model, trainer_state, weights)
        write_bytes_atomic(root / "latest", final.name.encode())
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = getattr(e, "strerror", None) or str(e)
        raise CheckpointError(
            f"cannot write checkpoint '{final}' ({why}): free space on that disk or fix its permissions, "
            "then continue with --resume; the earlier checkpoints are kept"
        ) from None
    # prune only checkpoints older than the one just written: newer-named leftovers of an abandoned
    # history must not push the new checkpoint out
    older = [d for d in _step_dirs(root) if d.name < final.name]
    for old in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint_dir(tmp: Path, final: Path, step: int, model, trainer_state: dict, weights) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model if weights is None else _StateDictView(weights), str(tmp / "model.safetensors"))
    buf = io.BytesIO()
    torch.save(trainer_state, buf)
    (tmp / "trainer.pt").write_bytes(buf.getvalue())
    files = {}
    for name in ("model.safetensors", "trainer.pt"):
        with open(tmp / name, "rb+") as f:
            os.fsync(f.fileno())
        files[name] = _sha256(tmp / name)
    manifest = {"format": FORMAT_VERSION, "step": step, "files": files}
    write_bytes_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def verify_checkpoint(path: Path) -> dict:
    """The manifest of a complete, uncorrupted checkpoint; raises CheckpointError naming the bad file."""
    man_path = path / MANIFEST
    if not man_path.is_file():
        raise CheckpointError(f"checkpoint '{path}' is incomplete (no {MANIFEST})")
    try:
        manifest = json.loads(man_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint '{path}': {MANIFEST} is corrupt") from None
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint '{path}' is missing {name}")
        if _sha256(f) != digest:
            raise CheckpointError(f"checkpoint '{path}': {name} fails its checksum (truncated or corrupted)")
    return manifest


def checkpoint_candidates(root: Path) -> list[Path]:
    """Checkpoints newest first, the one named by ``latest`` leading."""
    dirs = list(reversed(_step_dirs(root)))
    latest = root / "latest"
    if latest.is_file():
        named = root / latest.read_bytes().decode("utf-8", "replace").strip()
        if named in dirs:
            dirs.remove(named)
            dirs.insert(0, named)
    return dirs


def find_good_checkpoint(root: Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies; corrupt ones are reported and skipped (never deleted)."""
    for path in checkpoint_candidates(root):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as e:
            log(f"warning: {e}; falling back to an earlier checkpoint")
    return None


def load_trainer_state(path: Path) -> dict:
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint '{path}' does not fit this model (missing: {sorted(missing)[:4]}, "
            f"unexpected: {sorted(unexpected)[:4]}): was it written with another config?"
        )
