"""Text generation: read the prompt in parallel, then one recurrent step per new token.

    result = generate(model, prompt_ids, max_new_tokens=64, temperature=0.8, top_p=0.95,
                      generator=torch.Generator().manual_seed(0))
    result.tokens              # [B, T + n]: the prompt, then n <= max_new_tokens new tokens
    result.prefill_s, result.decode_s, result.tokens_per_s

``LanguageModel.prefill`` computes the prompt's logits and every layer's state in one parallel
pass; each new token then costs one ``step``: constant time for H3/S4D/GSS layers (fixed-size
SSM states), time growing with the position for attention (its KV cache) and Hyena.

Sampling: logits / temperature, then top-k (the k largest logits; ties with the k-th are
kept), then top-p on what is left (the smallest set of most likely tokens whose probability
reaches p, and any tied with the least likely of them), then a draw from ``generator``.
temperature 0 is greedy (argmax).
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from layers.base import check_float, check_int
from sandbox.model import LanguageModel

OWNER = "generate"
RELEASED_SUFFIXES = (".bin", ".pt")  # torch.save files, as the H3 release ships its weights


@dataclass(frozen=True)
class Generation:
    """Tokens and the timing split of one :func:`generate` call."""

    tokens: torch.Tensor  # [B, T + n] int64
    prompt_len: int  # T
    prefill_s: float  # the parallel pass over the prompt
    decode_s: float  # everything after it: n draws and n - 1 steps

    @property
    def new_tokens(self) -> int:
        return self.tokens.shape[1] - self.prompt_len

    @property
    def decode_ms_per_token(self) -> float:
        return 1e3 * self.decode_s / max(self.new_tokens, 1)

    @property
    def tokens_per_s(self) -> float:
        """New tokens over all sequences per second, the prompt's reading included."""
        return self.tokens.shape[0] * self.new_tokens / (self.prefill_s + self.decode_s)


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """logits [B, V] with the tokens that top-k, then top-p, remove set to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        ranked = torch.sort(logits, dim=-1, descending=True).values
        probs = ranked.softmax(-1)
        # A token goes when the more likely ones before it already reach top_p (so the most
        # likely token always stays); ties with the last one kept stay too, as in top-k (a
        # cut by sort order dropped the higher ids of equally likely tokens).
        kept = (probs.cumsum(-1) - probs < top_p).sum(-1, keepdim=True)
        logits = logits.masked_fill(logits < ranked.gather(-1, kept - 1), -math.inf)
    return logits


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> float:
    """The temperature as a float, once it and top_k, top_p are valid (ValueError otherwise:
    a negative temperature would reverse the distribution)."""
    temperature = check_float(OWNER, "temperature", temperature, 0.0, math.inf)
    if top_k is not None:
        check_int(OWNER, "top_k", top_k)
    if top_p is not None:
        # NaN fails the comparison too (a range check of any number came first: it called
        # NaN and inf out of "[-inf, inf)")
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
            raise ValueError(f"{OWNER}: top_p must be a number in (0, 1], got {top_p!r}")
    return temperature


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next-token logits [B, V] -> token ids [B] (argmax when temperature is 0)."""
    temperature = _check_sampling(temperature, top_k, top_p)  # a public helper too
    if temperature == 0:
        return logits.argmax(-1)
    # Shifted by the row maximum and in float64: divided by a tiny temperature (1e-40), float32
    # logits overflowed to inf (and 1e-300 itself rounds to 0 in float32), so the softmax gave
    # NaN; this way the best token stays at 0 and the others go to -inf at worst.
    logits = logits.double()
    probs = filter_logits((logits - logits.amax(-1, keepdim=True)) / temperature, top_k, top_p)
    probs = probs.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(
    model: LanguageModel,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    vocab_size: int | None = None,
) -> Generation:
    """Continue each prompt of ``prompt_ids`` [B, T] (T >= 1) by up to ``max_new_tokens``.

    ``generator`` (on the model's device) makes sampling reproducible. With ``eos_id``, a
    sequence that has produced it continues with eos_id, and generation stops once every
    sequence has. With ``vocab_size``, only ids below it are drawn (a model's vocabulary may be
    padded beyond its tokenizer's). The model runs in eval mode (restored afterwards).
    """
    if prompt_ids.is_floating_point() or prompt_ids.is_complex() or prompt_ids.dtype == torch.bool:
        raise ValueError(f"{OWNER}: prompt_ids must hold integer token ids, got {prompt_ids.dtype}")
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise ValueError(f"{OWNER}: prompt_ids must be [B, T] with T >= 1, got {prompt_ids.shape}")
    max_new_tokens = check_int(OWNER, "max_new_tokens", max_new_tokens)
    temperature = _check_sampling(temperature, top_k, top_p)
    vocab = model.embedding.num_embeddings
    if eos_id is not None and check_int(OWNER, "eos_id", eos_id, minimum=0) >= vocab:
        raise ValueError(
            f"{OWNER}: eos_id must be < {vocab} (the model's vocabulary), got {eos_id}"
        )
    if vocab_size is not None and check_int(OWNER, "vocab_size", vocab_size) > vocab:
        raise ValueError(f"{OWNER}: vocab_size must be <= {vocab} (the model's), got {vocab_size}")
    if prompt_ids.numel():
        lo, hi = int(prompt_ids.min()), int(prompt_ids.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{OWNER}: prompt token id {bad} is outside the model's 0 .. {vocab - 1}"
            )
    T = prompt_ids.shape[1]
    # The last new token is never fed back, so positions reach T + max_new_tokens - 2. Checked
    # before decoding starts (Hyena's max_len used to run out after the prompt pass).
    limit, what = model.length_limit()
    if T + max_new_tokens - 1 > limit:
        raise ValueError(
            f"{OWNER}: prompt length {T} + max_new_tokens {max_new_tokens} - 1 exceeds {what}"
        )

    was_training = model.training
    model.eval()
    try:
        device = prompt_ids.device
        _sync(device)
        start = time.perf_counter()
        logits, state = model.prefill(prompt_ids, last_only=True)
        _sync(device)
        prefill_s = time.perf_counter() - start
        logits = logits[:, -1]
        new, done = [], torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=device)
        while True:
            token = sample(logits[:, :vocab_size], temperature, top_k, top_p, generator)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done = done | (token == eos_id)
            new.append(token)
            if len(new) == max_new_tokens or (eos_id is not None and bool(done.all())):
                break
            logits, state = model.step(token, state)
        tokens = torch.cat([prompt_ids, torch.stack(new, dim=1)], dim=1)
        _sync(device)
        decode_s = time.perf_counter() - start - prefill_s
    finally:
        model.train(was_training)
    return Generation(tokens, T, prefill_s, decode_s)


def load_for_generation(checkpoint: str | Path, config: str | Path | None = None):
    """(LanguageModel on the CPU, tokenizer) from a pretrain run directory or checkpoint file
    (``config`` None), or from a released H3 checkpoint (.bin/.pt) with the pretrain ``config``
    YAML that describes its model (e.g. configs/pretrain/h3-125m.yaml)."""
    path = Path(checkpoint)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} not found")
    if config is None:
        if path.suffix in RELEASED_SUFFIXES:
            raise ValueError(f"{str(path)!r} is a released checkpoint: it needs --config")
        from sandbox.pretrain import load_pretrained

        return load_pretrained(path, device="cpu")

    from sandbox.data.tokenizer import get_tokenizer
    from sandbox.pretrain import build_model
    from sandbox.pretrain_config import load_pretrain_config
    from sandbox.released import load_released

    cfg = load_pretrain_config(config)
    model = build_model(cfg)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file: one line, exit 2
        raise ValueError(f"checkpoint {str(path)!r} cannot be read by torch.load: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r} does not hold a state dict")
    load_released(model, state)
    return model, get_tokenizer(cfg.data.tokenizer)
