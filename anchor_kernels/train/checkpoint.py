"""Checkpoints that survive a kill at any instant, and the RNG states that make a resumed
run repeat the uninterrupted one.

``save`` writes to a temporary file in the same folder, fsyncs it and ``os.replace``s it over
the old checkpoint (atomic on POSIX), so the file on disk is always the previous complete
checkpoint or the new complete one, never a torn write. ``load`` uses ``weights_only=True``:
a checkpoint holds only tensors and plain Python containers.
"""

from __future__ import annotations

import os
import tempfile

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save(state: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def _fsync_dir(folder: str) -> None:
    """Make the rename itself durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path!r} (a run writes "
                                f"{CHECKPOINT_NAME} into its --out-dir after each epoch)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"--resume: {path!r} is not a readable checkpoint: {exc}") from None


def capture_rng(device: torch.device, generators: dict[str, torch.Generator]) -> dict:
    """This process's RNG streams: torch's CPU and current-CUDA-device defaults (model init,
    attack random starts) and the trainer's own generators (augmentation)."""
    state = {"torch_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device)
    for name, g in generators.items():
        state[name] = g.get_state()
    return state


def restore_rng(state: dict, device: torch.device, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    if device.type == "cuda":
        if "torch_cuda" not in state:
            raise ValueError("--resume: the checkpoint was written by a CPU run; its CUDA random "
                             "stream cannot be restored on a GPU (resume with --device cpu)")
        torch.cuda.set_rng_state(state["torch_cuda"], device)
    for name, g in generators.items():
        g.set_state(state[name])
