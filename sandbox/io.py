"""Atomic file writes and single-file checkpoints.

A checkpoint is one safetensors file: model weights under ``model.``, optimizer tensors under
``optim.``, extra tensors (RNG state) under ``extra.``, and everything that is not a tensor
(step counters, optimizer hyper-parameters) as JSON in the metadata. One file written with
temp + rename is atomic, so a kill at any moment leaves either the old or the new checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def make_dir(path: str | Path) -> None:
    """``mkdir -p path`` for a command's --out; where it cannot be made (a file on its path, no
    permission), or exists but cannot be written, a one-line ValueError, which the CLI reports
    with exit 2 (an unwritable one was a PermissionError traceback from the first write)."""
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {str(path)!r}: cannot make the directory ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(path)!r}: the directory is not writable")


def read_record(path: str | Path, keys: tuple[str, ...] = (), fix: str = "") -> dict:
    """The JSON object in the file ``path`` with at least ``keys``; otherwise (a damaged or
    hand-edited file) a one-line ValueError naming the file, then ``fix`` (what to do)."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}){fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no JSON object{fix}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}{fix}")
    return data


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def terms_as_interrupts():
    """While the block runs, SIGTERM and SIGHUP (a timeout, kill, a closed terminal, a job
    scheduler) raise KeyboardInterrupt as Ctrl-C does. A parent process of workers needs that:
    ended outright, it would leave its workers running on as orphans beside the next run of
    the command. The previous handlers come back afterwards."""
    previous = {}
    try:
        for signum in (signal.SIGTERM, signal.SIGHUP):
            previous[signum] = signal.signal(signum, _interrupt)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _try_flock(fd: int) -> bool:
    """Take the exclusive flock on ``fd`` if no one holds it; whether it was taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextlib.contextmanager
def lock_dir(path: str | Path, refusal: Exception | None = None, wait_s: float = 0.0):
    """Hold an exclusive flock on the directory ``path`` (made if missing) while the block runs:
    one writer per directory (two runs resumed into one --out, a job submitted twice, wrote
    each step twice into metrics.jsonl). Another holder gets ``refusal``, by default a
    one-line ValueError naming the directory: at once, or once ``wait_s`` seconds have passed
    without the holder letting go (a line on stderr says it waits). The lock goes with the
    process. A directory this made is removed again if the block fails before writing into
    it (a bad config found when the model is built leaves nothing behind)."""
    made = not os.path.isdir(path)
    make_dir(path)
    fd, locked = os.open(path, os.O_RDONLY), False
    try:
        deadline, told = time.monotonic() + wait_s, False
        while not _try_flock(fd):
            left = deadline - time.monotonic()
            if left <= 0:
                default = ValueError(f"--out {str(path)!r}: another process is writing there")
                raise (refusal or default) from None
            if not told:
                print(f"{path}: another process is writing there; waiting up to {wait_s:.0f} s "
                      "for it to stop", file=sys.stderr, flush=True)  # fmt: skip
                told = True
            time.sleep(min(0.2, left))
        locked = True
        yield
    except BaseException:
        # Only by the holder: two writers that both found it missing both "made" it, and the
        # refused one removed the holder's directory, which then came back unlocked.
        if made and locked:
            with contextlib.suppress(OSError):  # not empty: what was written stays
                os.rmdir(path)
        raise
    finally:
        os.close(fd)  # releases the lock


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)``, flush the result to disk and rename it onto ``path``.

    The temp file sits alone in a private temp directory beside ``path``: safetensors'
    save_file writes a temp file of its own next to the name it is given, which a kill left
    behind in the run directory, full-size and under a name nothing recognised. fsync before the
    rename (and of the directory after it): without it, a host crash can leave the renamed file
    empty on disk, the old checkpoint gone with it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = os.path.join(tmp_dir, path.name)
    try:
        write(tmp)
        _fsync(tmp)
        # A plain open() gives the mode a file would have had; keep that, not a writer's choice.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        # Where the filesystem cannot fsync a directory, the rename stays as durable as it is.
        with contextlib.suppress(OSError):
            _fsync(path.parent)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _fsync(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries (a rename), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(directory: Path) -> None:
    """Delete what atomic_write calls killed before their rename left in a run directory
    (their temp directories, with a checkpoint and optimizer state in each: disk that nothing
    would free), whose one writer is the caller."""
    for tmp in directory.glob(".*.*.tmp"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # a temp file of an older version, which wrote them straight into ``directory``
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        meta["state"][str(pid)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value.detach().contiguous()
            else:
                meta["state"][str(pid)][name] = value
    return tensors, meta


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {int(p): dict(v) for p, v in meta["state"].items()}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    info: dict | None = None,
) -> None:
    """Write model (+ optimizer, extra tensors, JSON info) to one safetensors file, atomically."""
    # Tied weights are stored once; load_model_weights restores the tie via load_state_dict.
    seen, state = set(), {}
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        state[name] = t
    optim = optimizer.state_dict() if optimizer is not None else None
    save_state(path, state, optim, extra_tensors, info)


def save_state(
    path: str | Path,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict | None = None,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    info: dict | None = None,
) -> None:
    """:func:`save_checkpoint` from state dicts (as gathered from a sharded model)."""
    tensors = {f"model.{name}": t.detach().contiguous() for name, t in model_state.items()}
    meta: dict[str, Any] = {"info": info or {}}
    if optimizer_state is not None:
        opt_tensors, meta["optim"] = _split_optimizer_state(optimizer_state)
        tensors.update(opt_tensors)
    for name, t in (extra_tensors or {}).items():
        tensors[f"extra.{name}"] = t.detach().contiguous()
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"json": json.dumps(meta)}))


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint: {"model": state dict, "optim": state or None, "extra", "info"}."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["json"])
        tensors = load_file(str(path))
    except Exception as e:  # not safetensors, truncated, or not one of ours: one line
        kind = type(e).__name__
        raise ValueError(f"{str(path)!r} is not a sandbox checkpoint ({kind})") from None
    try:
        return _unpack(tensors, meta)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # another safetensors layout
        raise ValueError(f"{str(path)!r} is not a sandbox checkpoint ({e})") from None


def _unpack(tensors: dict[str, torch.Tensor], meta) -> dict:
    """load_checkpoint's dict from the file's tensors and JSON metadata."""
    if not isinstance(meta, dict) or not isinstance(meta.get("info"), dict):
        raise ValueError("no info in its metadata")
    groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optim": {}, "extra": {}}
    for key, value in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix not in groups or not rest:
            raise ValueError(f"tensor {key!r} is not under model., optim. or extra.")
        groups[prefix][rest if prefix != "optim" else key] = value
    optim = _join_optimizer_state(groups["optim"], meta["optim"]) if "optim" in meta else None
    return {
        "model": groups["model"],
        "optim": optim,
        "extra": groups["extra"],
        "info": meta["info"],
    }


def load_resume_checkpoint(path: Path, info: tuple[str, ...], extra: tuple[str, ...] = ()) -> dict:
    """load_checkpoint for --resume: a one-line ValueError unless the file holds optimizer
    state and the ``info`` and ``extra`` entries the command resumes from (another command's
    checkpoint, or final weights copied into its place, would fail later with a KeyError)."""
    ckpt = load_checkpoint(path)
    lacks = [k for k in info if k not in ckpt["info"]]
    lacks += [f"extra.{k}" for k in extra if k not in ckpt["extra"]]
    lacks += ["optimizer state"] if ckpt["optim"] is None else []
    if lacks:
        raise ValueError(
            f"--resume: {str(path)!r} is not a checkpoint of this command (no {', '.join(lacks)})"
        )
    return ckpt


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights saved by save_checkpoint (tied copies may be missing from the file); a
    one-line ValueError where they do not fit the model."""
    wanted = model.state_dict()
    for name, t in state.items():
        if name in wanted and t.shape != wanted[name].shape:
            raise ValueError(
                f"checkpoint does not match the model: {name} has shape {list(t.shape)}, the "
                f"model's {list(wanted[name].shape)}"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - set(
        n for n, _ in model.named_parameters()
    )
    really_missing = [m for m in missing if m not in tied]
    if really_missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing {really_missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
