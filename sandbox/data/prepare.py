"""``sandbox prepare-data``: Pile-format JSON-lines shards -> uint16 token files + index.json.

Inputs are JSON lines with a ``"text"`` field, plain (``.jsonl``) or zstandard-compressed
(``.jsonl.zst``, read as a stream), as the Pile ships. Every document is tokenized and followed
by the tokenizer's EOS. The output directory holds:

- ``train.bin``, ``val.bin``: raw little-endian uint16 token ids (``sandbox.data.TokenFile``
  memory-maps them), documents in input order;
- ``index.json``, written last: token and document counts per split, the tokenizer, the source
  files (size, sha256, lines, documents, malformed lines) and the split rule;
- ``progress.json`` while a job runs (removed when ``index.json`` is written).

Split. ``--val-fraction F``: a document goes to val when the first 8 bytes of
``sha256(b"<seed>:" + text_utf8)``, read as a big-endian integer, are below ``F * 2**64``. The rule
sees only the text and the seed, so it is the same on every rerun, resume and worker count.
``--val-files``: every document of those files goes to val, of the other inputs to train.

Malformed lines (invalid UTF-8, bad JSON, no string ``"text"``, a text with lone surrogates) are
skipped and counted per file and reason; the first few are printed as warnings and the first
``MAX_LISTED`` are listed in ``index.json`` with file and line number (1-based). Blank lines and a
UTF-8 byte order mark opening a file are skipped silently. A file that yields no document but
malformed lines is an error (a gzip file named .jsonl, say), as are inputs with no document at
all, and a .jsonl whose first bytes are a gzip, zstd, bzip2 or xz header.

Resume. Files are read in order and each in chunks of documents, tokenized by a pool of
``spawn`` worker processes; results are committed in order: the chunk's tokens are appended to
the .bin files (flush + fsync), then ``progress.json`` (committed tokens per split, lines done
per file) is replaced atomically. A rerun truncates each .bin to its committed length and goes on
from the recorded line, so a kill at any moment neither duplicates nor loses a document. A rerun of
a finished job does nothing; one with other inputs, tokenizer or split into the same directory is
refused. One job at a time per directory: a second one is refused while the first holds its lock
(flock on the directory), and a directory that holds .bin files but no job state is not written
to.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sandbox.data.dataset import DTYPE
from sandbox.data.tokenizer import get_tokenizer
from sandbox.pools import WorkerDied, stop_pool, worker_pool

SPLITS = ("train", "val")
FORMAT = 1
MAX_WARNINGS = 10  # malformed lines printed
MAX_LISTED = 100  # malformed lines listed in index.json (all are counted)


class DataError(ValueError):
    """Bad input or a mismatched output directory: one line naming the problem."""


# ---------------------------------------------------------------- reading


class _HashingReader(io.RawIOBase):
    """Pass-through raw reader that hashes and counts every byte read from the file."""

    def __init__(self, f):
        self._f = f
        self.hash = hashlib.sha256()
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._f.readinto(buffer)
        self.hash.update(memoryview(buffer)[:n])
        self.pos += n
        return n


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a zstd stream of one or more frames read from ``raw``. A file
    that ends inside a frame (a cut download) is a DataError: zstandard's stream_reader reads
    it as a clean end of file, and most of a shard would then be dropped without a word."""

    def __init__(self, raw: io.RawIOBase, path: str):
        import zstandard

        self._raw, self._path = raw, path
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = self._dctx.decompressobj()
        self._mid_frame = False  # input fed to self._frame that has not ended its frame
        self._out, self._at = b"", 0  # decompressed bytes, and how many were handed out

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out):
            data = self._raw.read(1 << 17)
            if not data:
                if self._mid_frame:
                    raise DataError(f"{self._path}: zstd stream ends inside a frame (truncated?)")
                return 0
            self._out, self._at = self._decompress(data), 0
        n = min(len(buffer), len(self._out) - self._at)
        memoryview(buffer)[:n] = self._out[self._at : self._at + n]
        self._at += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self._frame.decompress(data))
            self._mid_frame = not self._frame.eof
            if self._mid_frame:
                break
            data = self._frame.unused_data  # the next frame starts here
            self._frame = self._dctx.decompressobj()
        return b"".join(out)


# Headers of compressed files that a plain .jsonl would be misread from (as malformed lines).
_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
}


def _compressed_as_plain(path: Path) -> str | None:
    """The compression whose header opens a file not named .zst, or None."""
    if path.name.endswith(".zst"):
        return None
    with open(path, "rb") as f:
        head = f.read(6)
    return next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)


class _Source:
    """Lines (bytes) of one input file, decompressed if ``.zst``; sha256 of the file as read."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb")
        self._raw = _HashingReader(self._file)
        if path.endswith(".zst"):
            self.lines = io.BufferedReader(_ZstdFrames(self._raw, path), buffer_size=1 << 20)
        else:
            self.lines = io.BufferedReader(self._raw, buffer_size=1 << 20)

    @property
    def pos(self) -> int:
        return self._raw.pos

    def sha256(self) -> str:
        while self._raw.read(1 << 20):  # bytes the decoder did not need still belong to the file
            pass
        return self._raw.hash.hexdigest()

    def close(self) -> None:
        self._file.close()


@dataclass
class _Chunk:
    file: int
    first_line: int
    lines: list[bytes]
    pos: int  # bytes of the file read so far (progress bar)


@dataclass
class _FileEnd:
    file: int
    lines: int
    sha256: str


def _read(sources: list[dict], files: list[dict], chunk_docs: int):
    """Yield the chunks of lines still to do, and a _FileEnd after each file."""
    for i, (src, state) in enumerate(zip(sources, files)):
        if state["done"]:
            continue
        reader, n = None, 0
        try:
            reader = _Source(src["path"])
            skip, batch = state["lines"], []
            for n, line in enumerate(reader.lines, 1):
                if n <= skip:
                    continue
                if n == 1 and line.startswith(b"\xef\xbb\xbf"):  # a byte order mark
                    line = line[3:]
                batch.append(line)
                if len(batch) == chunk_docs:
                    yield _Chunk(i, n - len(batch) + 1, batch, reader.pos)
                    batch = []
            if batch:
                yield _Chunk(i, n - len(batch) + 1, batch, reader.pos)
            yield _FileEnd(i, n, reader.sha256())
        except _zstd_errors() as e:
            raise DataError(f"{src['path']}: corrupt zstd stream after line {n}: {e}") from None
        except OSError as e:
            raise DataError(f"{src['path']}: cannot read after line {n}: {e}") from None
        finally:
            if reader is not None:
                reader.close()


def _zstd_errors() -> tuple[type[BaseException], ...]:
    try:
        import zstandard
    except ImportError:
        return ()
    return (zstandard.ZstdError,)


# ---------------------------------------------------------------- tokenizing (in the workers)


def is_val(text_utf8: bytes, val_fraction: float, seed: int) -> bool:
    """The documented hash split rule (see the module docstring)."""
    digest = hashlib.sha256(f"{seed}:".encode() + text_utf8).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


def _parse(line: bytes) -> tuple[str | None, bytes | None, str | None, str | None]:
    """(text, text_utf8, reason, detail); text None and reason None for a blank line."""
    if not line.strip():
        return None, None, None, None
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, None, "invalid_utf8", f"invalid UTF-8 at byte {e.start}"
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as e:
        return None, None, "bad_json", f"bad JSON ({e.msg}, column {e.colno})"
    except ValueError as e:  # an integer of more digits than int() converts
        return None, None, "bad_json", f"bad JSON ({e})"
    except RecursionError:
        return None, None, "bad_json", "bad JSON (nested too deeply)"
    if not isinstance(obj, dict) or "text" not in obj:
        return None, None, "missing_text", 'no "text" field'
    text = obj["text"]
    if not isinstance(text, str):
        return None, None, "text_not_string", f'"text" is {type(text).__name__}, not a string'
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        return None, None, "invalid_utf8", '"text" has a lone surrogate escape (not UTF-8)'
    return text, data, None, None


def _tokenize_chunk(
    tokenizer: str, lines: list[bytes], first_line: int, split: str, val_fraction: float, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, int], list[tuple[int, str, str]]]:
    """Tokens per split (EOS after each document), documents per split, malformed lines."""
    tok = get_tokenizer(tokenizer)
    ids: dict[str, list[int]] = {s: [] for s in SPLITS}
    docs = dict.fromkeys(SPLITS, 0)
    malformed = []
    for number, line in enumerate(lines, first_line):
        text, data, reason, detail = _parse(line)
        if reason is not None:
            malformed.append((number, reason, detail))
            continue
        if text is None:
            continue
        s = split if split != "hash" else ("val" if is_val(data, val_fraction, seed) else "train")
        ids[s].extend(tok.encode(text))
        ids[s].append(tok.eot_token)
        docs[s] += 1
    return {s: np.asarray(ids[s], dtype=DTYPE) for s in SPLITS}, docs, malformed


# ---------------------------------------------------------------- the job


def _sources(inputs: Sequence[str], val_files: Sequence[str]) -> list[dict]:
    """Input files in order, each with its split ("hash", "train" or "val") and size."""
    val = [str(Path(p).resolve()) for p in val_files]
    paths, out = [], []
    for given, split in [(p, "train" if val_files else "hash") for p in inputs] + [
        (p, "val") for p in val_files
    ]:
        path = Path(given)
        if path.is_dir():
            raise DataError(f"{given} is a directory; give its files (e.g. {given}/*.jsonl.zst)")
        if path.exists() and not path.is_file():  # a FIFO, /dev/null: read twice, they differ
            raise DataError(f"{given} is not a regular file; give a .jsonl or .jsonl.zst file")
        if not path.is_file():
            raise DataError(f"input file not found: {given}")
        try:
            compressed = _compressed_as_plain(path)
        except OSError as e:
            raise DataError(f"{given}: cannot read: {e.strerror}") from None
        if compressed:
            raise DataError(
                f"{given} is {compressed}-compressed: prepare-data reads .jsonl and .jsonl.zst"
            )
        resolved = str(path.resolve())
        if resolved in paths:
            if resolved in val:  # a val file may also match the INPUT glob: it is val only
                continue
            raise DataError(f"input file given twice: {given}")
        if resolved in val:
            split = "val"
        paths.append(resolved)
        out.append({"path": resolved, "size": path.stat().st_size, "split": split})
    return out


def _check_same_job(old: dict, new: dict, out: Path) -> None:
    def refuse(what: str) -> None:
        raise DataError(f"{out} holds another job ({what}); use another --out or delete it")

    if old["tokenizer"] != new["tokenizer"]:
        refuse(f"tokenizer {old['tokenizer']!r} there, {new['tokenizer']!r} here")
    if old["split"] != new["split"]:
        refuse(f"split {old['split']} there, {new['split']} here")
    before = [(s["path"], s["split"]) for s in old["sources"]]
    now = [(s["path"], s["split"]) for s in new["sources"]]
    for a, b in zip(before, now):
        if a != b:
            refuse(f"input {a[0]} ({a[1]}) there, {b[0]} ({b[1]}) here")
    if len(before) != len(now):
        refuse(f"{len(before)} input files there, {len(now)} here")
    for a, b in zip(old["sources"], new["sources"]):
        if a["size"] != b["size"]:
            refuse(f"{a['path']} was {a['size']} bytes, is {b['size']} now")


def _write_json(path: Path, obj: dict) -> None:
    from sandbox.io import atomic_write_text  # sandbox.io imports torch: keep it out of workers

    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _fresh_state(job: dict) -> dict:
    return {
        "format": FORMAT,
        "job": job,
        "splits": {s: {"tokens": 0, "documents": 0} for s in SPLITS},
        "files": [
            {
                "lines": 0,
                "done": False,
                "sha256": None,
                "documents": dict.fromkeys(SPLITS, 0),
                "tokens": dict.fromkeys(SPLITS, 0),
                "malformed": {},
            }
            for _ in job["sources"]
        ],
        "malformed_listed": [],
    }


def _load_state(path: Path, what: str) -> dict:
    """index.json or progress.json (``what``), checked to be one that prepare-data wrote."""
    try:
        state = json.loads(path.read_text())
        fmt, sources = state["format"], state["job"]["sources"]
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"{path}: not a prepare-data {what} file ({e!r})") from None
    if fmt != FORMAT or not isinstance(sources, list):
        raise DataError(f"{path}: not a {what} file of this version (format {FORMAT})")
    return state


@contextlib.contextmanager
def _locked(out: Path):
    """Hold the directory ``out``'s lock: two jobs appending to one directory's .bin files
    would interleave their documents."""
    from sandbox.io import lock_dir  # here: the spawned workers need not import torch

    with lock_dir(out, DataError(f"{out}: another prepare-data job is writing there")):
        yield


def _open_bin(path: Path, tokens: int, fresh: bool):
    """Open a .bin for appending, cut back to its committed length. A ``fresh`` job refuses a
    non-empty one: it is not this job's (a nanoGPT-style train.bin, say) and would be lost."""
    f = open(path, "a+b")
    size, committed = os.fstat(f.fileno()).st_size, tokens * DTYPE.itemsize
    if fresh and size:
        f.close()
        raise DataError(
            f"{path} exists ({size} bytes) but {path.parent} holds no prepare-data job state "
            "(index.json or progress.json); use another --out or delete it"
        )
    if size < committed:
        f.close()
        raise DataError(
            f"{path} has {size} bytes, progress.json committed {committed}: "
            "the directory was changed by hand; delete it and start over"
        )
    f.truncate(committed)
    return f


def _open_bins(out: Path, state: dict, fresh: bool) -> dict:
    """Both splits' .bin files opened by _open_bin; none left open if one fails."""
    bins = {}
    try:
        for s in SPLITS:
            path = out / f"{s}.bin"
            try:
                bins[s] = _open_bin(path, state["splits"][s]["tokens"], fresh)
            except OSError as e:
                raise DataError(f"{path}: cannot open for writing: {e.strerror}") from None
    except DataError:
        for f in bins.values():
            f.close()
        raise
    return bins


def _index(state: dict) -> dict:
    job, files = state["job"], state["files"]
    by_reason: dict[str, int] = {}
    for f in files:
        for reason, count in f["malformed"].items():
            by_reason[reason] = by_reason.get(reason, 0) + count
    tok = get_tokenizer(job["tokenizer"])
    return {
        "format": FORMAT,
        "dtype": "uint16",
        "byte_order": "little",
        "tokenizer": {"name": tok.name, "vocab_size": tok.vocab_size, "eot_token": tok.eot_token},
        "split": job["split"],
        "splits": {s: {"file": f"{s}.bin", **state["splits"][s]} for s in SPLITS},
        "sources": [
            {
                "path": src["path"],
                "size": src["size"],
                "sha256": f["sha256"],
                "split": src["split"],
                "lines": f["lines"],
                "documents": f["documents"],
                "tokens": f["tokens"],
                "malformed": sum(f["malformed"].values()),
                "malformed_by_reason": f["malformed"],
            }
            for src, f in zip(job["sources"], files)
        ],
        "malformed": {
            "count": sum(by_reason.values()),
            "by_reason": by_reason,
            "listed": state["malformed_listed"],
        },
        "job": job,
    }


def prepare_data(
    inputs: Sequence[str],
    out: str | Path,
    tokenizer: str = "gpt2",
    val_fraction: float | None = None,
    val_files: Sequence[str] = (),
    workers: int | None = None,
    seed: int = 0,
    chunk_docs: int = 1024,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    hook: Callable[[str, int], None] | None = None,
) -> dict:
    """Tokenize ``inputs`` into ``out`` (see the module docstring); return the index.

    ``val_fraction`` defaults to 0.01 unless ``val_files`` are given (the two exclude each other).
    ``hook(event, n)`` is for tests: called after the n-th commit's tokens are appended
    ("appended", before progress.json is replaced) and after it is committed ("committed").
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if val_files and val_fraction is not None:
        raise DataError("give --val-fraction or --val-files, not both")
    if val_fraction is None:
        val_fraction = 0.0 if val_files else 0.01
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    tok = get_tokenizer(tokenizer)
    if tok.vocab_size > np.iinfo(DTYPE).max + 1:
        raise DataError(f"tokenizer {tokenizer!r} has {tok.vocab_size} ids: more than uint16 holds")
    split = (
        {"rule": "files"}
        if val_files
        else {"rule": "hash", "val_fraction": val_fraction, "seed": seed}
    )
    job = {"tokenizer": tok.name, "split": split, "sources": _sources(inputs, val_files)}

    out = Path(out)
    with _locked(out):  # makes out, and removes it again if the job fails before writing
        return _run_job(job, out, workers, chunk_docs, progress, log, hook)


def _run_job(job, out: Path, workers, chunk_docs, progress, log, hook) -> dict:
    """prepare_data's job in the directory ``out``, which the caller holds locked."""
    tokenizer = job["tokenizer"]
    val_fraction, seed = job["split"].get("val_fraction", 0.0), job["split"].get("seed", 0)
    index_path, progress_path = out / "index.json", out / "progress.json"
    if index_path.exists():
        index = _load_state(index_path, "index")
        _check_same_job(index["job"], job, out)
        log(f"{out} is already prepared; nothing to do")
        return index
    fresh = not progress_path.exists()
    if fresh:
        state = _fresh_state(job)
    else:
        state = _load_state(progress_path, "progress")
        _check_same_job(state["job"], job, out)
        log(f"resuming in {out}")

    workers = workers or os.cpu_count() or 1
    bins = _open_bins(out, state, fresh)
    if fresh:  # from here on a kill leaves a job to resume, not .bin files of no job
        _write_json(progress_path, state)
    sources, files = job["sources"], state["files"]
    bar = None
    if progress:
        from tqdm import tqdm

        done_bytes = sum(src["size"] for src, f in zip(sources, files) if f["done"])
        total = sum(src["size"] for src in sources)
        bar = tqdm(total=total, initial=done_bytes, unit="B", unit_scale=True, desc="prepare")
    commits = 0

    def commit(item, future) -> None:
        nonlocal commits
        f = files[item.file]
        if isinstance(item, _FileEnd):
            if not any(f["documents"].values()) and f["malformed"]:
                raise DataError(
                    f"{sources[item.file]['path']}: no document in {item.lines} lines, "
                    f"malformed: {f['malformed']} (prepare-data reads JSON lines with a "
                    '"text" field, plain .jsonl or .jsonl.zst)'
                )
            f.update(done=True, lines=item.lines, sha256=item.sha256)
        else:
            arrays, docs, malformed = future.result()
            try:
                for s in SPLITS:
                    bins[s].write(arrays[s].tobytes())
                for b in bins.values():
                    b.flush()
                    os.fsync(b.fileno())
            except OSError as e:  # a full disk: the rerun cuts the .bin files back and goes on
                raise DataError(f"{out}: cannot write the token files: {e.strerror}") from None
            commits += 1
            if hook:
                hook("appended", commits)
            for s in SPLITS:
                state["splits"][s]["tokens"] += len(arrays[s])
                state["splits"][s]["documents"] += docs[s]
                f["tokens"][s] += len(arrays[s])
                f["documents"][s] += docs[s]
            f["lines"] = item.first_line + len(item.lines) - 1
            seen = sum(sum(g["malformed"].values()) for g in files)
            for k, (number, reason, detail) in enumerate(malformed, seen):
                if k < MAX_WARNINGS:
                    log(f"sandbox: warning: {sources[item.file]['path']}:{number}: {detail}")
                if len(state["malformed_listed"]) < MAX_LISTED:
                    state["malformed_listed"].append(
                        {
                            "file": sources[item.file]["path"],
                            "line": number,
                            "reason": reason,
                            "detail": detail,
                        }
                    )
                f["malformed"][reason] = f["malformed"].get(reason, 0) + 1
            if bar is not None:
                prior = sum(src["size"] for src, g in zip(sources, files) if g["done"])
                bar.update(prior + item.pos - bar.n)
        _write_json(progress_path, state)
        if hook and isinstance(item, _Chunk):
            hook("committed", commits)

    try:
        pool = None
        if workers > 1:
            pool = worker_pool(workers)
        completed = False
        try:
            pending: deque = deque()
            for item in _read(sources, files, chunk_docs):
                future = None
                if isinstance(item, _Chunk):
                    args = (tokenizer, item.lines, item.first_line, sources[item.file]["split"])
                    args += (val_fraction, seed)
                    if pool is not None:
                        future = pool.submit(_tokenize_chunk, *args)
                    else:
                        future = Future()
                        future.set_result(_tokenize_chunk(*args))
                pending.append((item, future))
                while len(pending) > 2 * workers:  # keep the pool fed, memory bounded
                    commit(*pending.popleft())
            while pending:
                commit(*pending.popleft())
            completed = True
        except BrokenProcessPool:
            raise WorkerDied(
                "a tokenizer worker process died (killed, or out of memory); the chunks "
                f"committed are kept: rerun the same command to continue in {out}"
            ) from None
        finally:
            if pool is not None and completed:
                pool.shutdown(wait=True)
            elif pool is not None:  # an error or Ctrl-C: the chunks in flight are not wanted
                stop_pool(pool)
            for b in bins.values():
                b.close()
            if bar is not None:
                bar.close()

        if not any(state["splits"][s]["documents"] for s in SPLITS):
            raise DataError(f"no document in the inputs: {[src['path'] for src in sources]}")
    except DataError:
        # Nothing committed: no job to resume, only files that would refuse the corrected
        # command as "another job" (an empty or all-malformed input, a truncated download).
        if not any(state["splits"][s]["documents"] for s in SPLITS):
            for path in (progress_path, *(out / f"{s}.bin" for s in SPLITS)):
                path.unlink(missing_ok=True)
        raise
    index = _index(state)
    _write_json(index_path, index)
    progress_path.unlink()
    if index["malformed"]["count"]:
        log(
            f"sandbox: warning: {index['malformed']['count']} malformed lines skipped "
            f"({index['malformed']['by_reason']}); see {index_path}"
        )
    return index
