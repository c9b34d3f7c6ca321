"""Pretraining data: tokenizers, ``prepare-data`` (JSONL shards -> uint16 token files), a reader."""

from sandbox.data.dataset import TokenFile
from sandbox.data.tokenizer import get_tokenizer

__all__ = ["TokenFile", "get_tokenizer"]
