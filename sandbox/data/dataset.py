"""Read the token files that ``sandbox prepare-data`` writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DTYPE = np.dtype("<u2")  # uint16, little-endian: GPT-2's 50257 ids fit


class TokenFile:
    """A ``train.bin`` / ``val.bin`` memory-mapped as a read-only 1-D uint16 array.

    ``len(f)`` is the number of tokens; ``f[i:j]`` is a numpy view (no copy) that pretraining
    can cut windows of ``seq_len + 1`` tokens from. An empty file gives an empty array.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        if size % DTYPE.itemsize:
            raise ValueError(f"{self.path}: {size} bytes is not a whole number of uint16 tokens")
        if size == 0:  # numpy cannot map an empty file
            self.tokens = np.zeros(0, dtype=DTYPE)
        else:
            self.tokens = np.memmap(self.path, dtype=DTYPE, mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        return self.tokens[index]

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, tokens={len(self)})"
