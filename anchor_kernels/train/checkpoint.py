"""Checkpoints that survive a kill at any instant, and the RNG states that make a resumed
run repeat the uninterrupted one.

``save`` writes to a temporary file in the same folder, fsyncs it and ``os.replace``s it over
the old checkpoint (atomic on POSIX), so the file on disk is always the previous complete
checkpoint or the new complete one, never a torn write; a temporary left by a kill during a
save is removed by ``remove_stale_temporaries`` when the next run starts.

File format: one header line ``anchor-kernels checkpoint sha256=<hex>`` then the
``torch.save`` payload; ``load`` refuses a file whose payload does not match the digest
(bit rot, a partial copy) before unpickling it, loads with ``weights_only=True`` (tensors and
plain Python containers only) and checks the keys the trainer reads.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import tempfile

import torch

CHECKPOINT_NAME = "checkpoint.pt"
MAGIC = b"anchor-kernels checkpoint sha256="
TEMP_PATTERN = ".checkpoint-*.tmp"
# What ``Trainer.state_dict`` writes and ``Trainer`` reads back, with the expected types.
REQUIRED = {"format": int, "epoch": int, "global_step": int, "phase": int, "config": dict,
            "model": dict, "optimizer": dict, "rng": list, "world_size": int,
            "device_type": str}


def save(state: dict, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getbuffer()
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
            fh.write(payload)
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


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporaries an interrupted ``save`` left in ``folder``; their paths."""
    stale = glob.glob(os.path.join(glob.escape(folder), TEMP_PATTERN))
    for tmp in stale:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return stale


def load(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path!r} (a run writes "
                                f"{CHECKPOINT_NAME} into its --out-dir after each epoch)")
    with open(path, "rb") as fh:
        data = fh.read()
    header, _, payload = data.partition(b"\n")
    if not header.startswith(MAGIC):
        raise ValueError(f"--resume: {path!r} is not an anchor_kernels checkpoint (it does not "
                         f"start with the {MAGIC.decode()!r} header this trainer writes)")
    if hashlib.sha256(payload).hexdigest().encode() != header[len(MAGIC):]:
        raise ValueError(f"--resume: {path!r} is corrupted: its contents do not match the "
                         "SHA-256 digest written with them (a damaged or truncated file)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"--resume: {path!r} is not a readable checkpoint: "
                         f"{_one_line(exc)}") from None
    check_structure(state, path)
    return state


def check_structure(state, path: str) -> None:
    """ValueError naming what is missing or of the wrong type in a loaded checkpoint."""
    if not isinstance(state, dict):
        raise ValueError(f"--resume: {path!r} holds a {type(state).__name__}, not a trainer "
                         "checkpoint (a dict)")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"--resume: {path!r} lacks {', '.join(missing)}: not a checkpoint "
                         "written by this trainer")
    wrong = [f"{k} is {type(state[k]).__name__}, expected {t.__name__}"
             for k, t in REQUIRED.items() if not isinstance(state[k], t)]
    if wrong:
        raise ValueError(f"--resume: {path!r} is malformed: " + "; ".join(wrong))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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
