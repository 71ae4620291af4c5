"""Decoding with a KV cache: prefill once, then one token at a time; samplers and beam search.

Axes: B batch, S cache slots, L layers, K kv heads, H head dim, V vocabulary; beam search adds
a beam axis of length `beam_size` (written `beams` below).

The cache has one slot per prompt token (image + text, padding included) followed by one
slot per generated token. Slots are shared by the batch (step t of every example writes slot
P + T + t) while positions and validity are per example, so prompts of different lengths need
no re-alignment: an example's padding slots are simply never attended to, and its generated
tokens continue its own positions.
"""

import dataclasses
import re
from typing import NamedTuple

import numpy as np

from . import gemma
from .config import PaliGemmaConfig
from .mask import sliding_window
from .model import embed_image_and_text, num_image_tokens, prefix_lm_masks, validate_inputs
from .ops import compute_dtype, log_softmax, softmax


@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer plus per-example bookkeeping (mutated in place)."""

    k: np.ndarray  # [L, B, S, K, H]
    v: np.ndarray  # [L, B, S, K, H]
    valid: np.ndarray  # [B, S] bool: slot holds a real token of this example
    positions: np.ndarray  # [B, S] int: RoPE position of the token in each slot
    lengths: np.ndarray  # [B] int: real tokens so far = position of the next token
    next_slot: int  # slot the next token is written to

    def select(self, rows):
        """A cache whose example b is example `rows[b]` of this one (beam reordering)."""
        return KVCache(self.k[:, rows], self.v[:, rows], self.valid[rows], self.positions[rows],
                       self.lengths[rows], self.next_slot)


def prefill(params, config: PaliGemmaConfig, images, tokens, mask_ar, input_mask, max_new_tokens,
            cache_dtype=None):
    """Runs the prompt, fills the cache, and returns the logits for each example's next token.

    Args:
      images [B, R, R, 3] or [B, F, R, R, 3], tokens [B, T], mask_ar [B, T], input_mask [B, T]: as in `forward`.
      max_new_tokens: slots reserved for generated tokens.
      cache_dtype: dtype K/V are stored in (default: the compute dtype; big_vision uses bf16).
    Returns:
      (cache, logits [B, V]) where logits follow each example's last real token.
    """
    g = config.llm
    images, tokens, mask_ar, input_mask = validate_inputs(config, images, tokens, mask_ar, input_mask)
    x, full_mask, full_ar = embed_image_and_text(params, config, images, tokens, mask_ar, input_mask)
    B, N, _ = x.shape
    S = N + max_new_tokens
    attn_mask, local_mask, positions = prefix_lm_masks(config, full_mask, full_ar)
    pad = lambda m: None if m is None else np.pad(m, ((0, 0), (0, 0), (0, S - N)))  # noqa: E731
    dtype = cache_dtype or x.dtype
    kv_shape = (g.depth, B, S, g.num_kv_heads, g.head_dim)
    cache = KVCache(
        k=np.zeros(kv_shape, dtype), v=np.zeros(kv_shape, dtype),
        valid=np.pad(full_mask, ((0, 0), (0, S - N))),
        positions=np.pad(positions, ((0, 0), (0, S - N))),
        lengths=full_mask.sum(axis=1), next_slot=N,
    )
    pre_logits = gemma.transformer(params["llm"], x, positions, pad(attn_mask), g, pad(local_mask),
                                   (cache.k, cache.v, 0))  # [B, N, D]
    last = N - 1 - np.argmax(full_mask[:, ::-1], axis=1)  # [B] index of the last real token
    last_pre_logits = pre_logits[np.arange(B), last][:, None]  # [B, 1, D]
    return cache, gemma.logits(params["llm"], last_pre_logits, g)[:, 0]  # [B, V]


def extend(params, config: PaliGemmaConfig, cache: KVCache, tokens):
    """Feeds one token per example; returns the logits for the following token.

    Each new token attends to every real token of its example so far, itself included.

    Args:
      cache: from `prefill` (updated in place).
      tokens: [B] int.
    Returns:
      logits [B, V].
    """
    g = config.llm
    tokens = np.asarray(tokens)
    B, V = cache.lengths.shape[0], g.vocab_size
    if tokens.shape != (B,) or not np.issubdtype(tokens.dtype, np.integer) or tokens.min() < 0 or tokens.max() >= V:
        raise ValueError(f"tokens: expected {B} integer ids in [0, {V}), got {tokens.dtype} {list(tokens.shape)} "
                         f"with values {tokens.min() if tokens.size else '-'}..{tokens.max() if tokens.size else '-'}")
    slot = cache.next_slot
    if slot >= cache.valid.shape[1]:
        raise ValueError(f"extend: the cache holds {cache.valid.shape[1]} slots and all are used")
    embed = params["llm"]["embedder"]
    x = gemma.embed_tokens(embed, tokens[:, None], compute_dtype(embed["input_embedding"]))  # [B, 1, D]
    positions = cache.lengths[:, None]  # [B, 1]
    cache.valid[:, slot] = True
    cache.positions[:, slot] = cache.lengths
    attn_mask = cache.valid[:, None, :]  # [B, 1, S]
    local_mask = sliding_window(attn_mask, positions, cache.positions, g.sliding_window)
    pre_logits = gemma.transformer(params["llm"], x, positions, attn_mask, g, local_mask,
                                   (cache.k, cache.v, slot))  # [B, 1, D]
    cache.lengths = cache.lengths + 1
    cache.next_slot = slot + 1
    return gemma.logits(params["llm"], pre_logits, g)[:, 0]  # [B, V]


# --- Samplers -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How the next token is chosen. Parse from strings with `parse_sampler`."""

    kind: str = "greedy"  # greedy | temperature | top_k | nucleus | beam
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beam_size: int = 1


_SAMPLER_SPECS = "greedy, temperature(t), top_k(k[, t]), nucleus(p[, t]), beam(n)"


def parse_sampler(spec):
    """`"greedy"`, `"temperature(0.7)"`, `"top_k(40)"`, `"top_k(40, 0.8)"`, `"nucleus(0.9)"`,
    `"nucleus(0.9, 0.8)"`, `"beam(4)"` (big_vision's spelling), or a `Sampler`."""
    if isinstance(spec, Sampler):
        return spec
    match = re.fullmatch(r"\s*(\w+)\s*(?:\((.*)\))?\s*", str(spec))
    if not match:
        raise ValueError(f"sampler: expected one of {_SAMPLER_SPECS}, got {spec!r}")
    name, args = match.group(1), match.group(2)
    try:
        values = [float(a) for a in args.split(",")] if args else []
    except ValueError:
        raise ValueError(f"sampler: expected numeric arguments in {spec!r}") from None
    arity = {"greedy": (0, 0), "temperature": (1, 1), "top_k": (1, 2), "nucleus": (1, 2), "beam": (1, 1)}
    if name not in arity or not arity[name][0] <= len(values) <= arity[name][1]:
        raise ValueError(f"sampler: expected one of {_SAMPLER_SPECS}, got {spec!r}")
    if name == "temperature":
        sampler = Sampler("temperature", temperature=values[0])
    elif name == "top_k":
        sampler = Sampler("top_k", top_k=int(values[0]), temperature=values[1] if len(values) > 1 else 1.0)
    elif name == "nucleus":
        sampler = Sampler("nucleus", top_p=values[0], temperature=values[1] if len(values) > 1 else 1.0)
    elif name == "beam":
        sampler = Sampler("beam", beam_size=int(values[0]))
    else:
        sampler = Sampler("greedy")
    if sampler.temperature <= 0 or sampler.beam_size < 1 or not 0 < sampler.top_p <= 1 or (
            name == "top_k" and sampler.top_k < 1):
        raise ValueError(f"sampler: temperature > 0, top_k >= 1, 0 < p <= 1 and beam >= 1 required, got {spec!r}")
    return sampler


def sampling_logits(logits, sampler: Sampler):
    """Logits after temperature and top-k / nucleus truncation (cut tokens get -inf).

    Nucleus follows big_vision: sort descending, keep the tokens whose cumulative probability
    before them is below p (so the token that reaches p is kept), ties with the last kept too.

    Args:
      logits: [B, V].
    Returns:
      [B, V].
    """
    logits = logits / sampler.temperature
    if sampler.kind == "top_k":
        k = min(sampler.top_k, logits.shape[-1])
        kth = np.sort(logits, axis=-1)[:, -k][:, None]  # [B, 1]
        logits = np.where(logits >= kth, logits, -np.inf)
    elif sampler.kind == "nucleus":
        ordered = np.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        cumulative = np.cumsum(softmax(ordered, axis=-1), axis=-1)  # [B, V]
        cut = np.minimum(np.sum(cumulative < sampler.top_p, axis=-1), logits.shape[-1] - 1)  # [B]
        threshold = ordered[np.arange(len(cut)), cut][:, None]  # [B, 1]
        logits = np.where(logits >= threshold, logits, -np.inf)
    return logits


def sample(logits, sampler: Sampler, rng):
    """Next token per example: [B, V] -> [B]."""
    if sampler.kind == "greedy":
        return np.argmax(logits, axis=-1)
    probs = softmax(sampling_logits(logits.astype(np.float64), sampler), axis=-1)  # [B, V]
    cdf = np.cumsum(probs, axis=-1)  # [B, V]
    u = rng.random(len(probs))[:, None] * cdf[:, -1:]  # [B, 1]
    return np.minimum(np.sum(cdf <= u, axis=-1), probs.shape[-1] - 1)  # [B]


# --- Generation ---------------------------------------------------------------------------


class Generation(NamedTuple):
    """Generated tokens (padding after each example's EOS) and their log-probabilities under
    the model (log-softmax of the raw logits, 0 after EOS)."""

    tokens: np.ndarray  # [B, max_new_tokens] int
    logprobs: np.ndarray  # [B, max_new_tokens]

    def lengths(self, eos_id=1):
        """Tokens produced per example, EOS included: [B]."""
        is_eos = self.tokens == eos_id
        return np.where(is_eos.any(axis=1), np.argmax(is_eos, axis=1) + 1, self.tokens.shape[1])


CONTEXT = 8192  # positions every PaliGemma language model (Gemma 1 and 2) was trained for


def check_context(positions, what, error=ValueError):
    """Raises `error` naming both numbers when `positions` exceed the language model's context."""
    if positions > CONTEXT:
        raise error(f"{what} = {positions} positions, more than the language model's context of {CONTEXT}")


def validate_generate_args(config, images, tokens, mask_ar, input_mask, max_new_tokens, sampler):
    """`validate_inputs` plus the decoding arguments; returns the arrays and a `Sampler`."""
    images, tokens, mask_ar, input_mask = validate_inputs(config, images, tokens, mask_ar, input_mask)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens!r}")
    P = num_image_tokens(config, images.shape)
    check_context(P + tokens.shape[1] + max_new_tokens,
                  f"prompt: {P} image tokens + {tokens.shape[1]} text tokens + {max_new_tokens} new tokens")
    empty = np.flatnonzero(~input_mask.any(axis=1))
    if empty.size:
        raise ValueError(f"input_mask: expected at least one real token per example, got none in examples {empty.tolist()}")
    return images, tokens, mask_ar, input_mask, parse_sampler(sampler)


def generate(params, config: PaliGemmaConfig, images, tokens, mask_ar, input_mask=None,
             max_new_tokens=32, sampler="greedy", seed=0, cache_dtype=None):
    """Continues each prompt until EOS or `max_new_tokens`.

    Args:
      params, config, images [B, (F,) R, R, 3], tokens [B, T], mask_ar [B, T], input_mask [B, T]:
        the prompt as for `forward`, left-aligned (`[BOS] prefix "\\n"`, optional forced suffix
        with `mask_ar = 1`, then padding with `input_mask = False`). Prompt lengths may differ.
      max_new_tokens: at most this many tokens per example (EOS included).
      sampler: a `Sampler` or a spec string, see `parse_sampler`.
      seed: seeds every random choice, so a call is reproducible.
      cache_dtype: KV cache dtype (default: compute dtype; `ml_dtypes.bfloat16` mimics big_vision).
    Returns:
      `Generation(tokens [B, max_new_tokens], logprobs [B, max_new_tokens])`.
    """
    images, tokens, mask_ar, input_mask, sampler = validate_generate_args(
        config, images, tokens, mask_ar, input_mask, max_new_tokens, sampler)
    cache, logits = prefill(params, config, images, tokens, mask_ar, input_mask, max_new_tokens, cache_dtype)
    if sampler.kind == "beam":
        return beam_search(params, config, cache, logits, sampler.beam_size, max_new_tokens)

    rng = np.random.default_rng(seed)
    B = tokens.shape[0]
    out = np.full((B, max_new_tokens), config.pad_id, dtype=np.int64)
    out_logp = np.zeros((B, max_new_tokens))
    done = np.zeros(B, dtype=bool)
    for step in range(max_new_tokens):
        token = sample(logits, sampler, rng)  # [B]
        logp = log_softmax(logits.astype(np.float64))[np.arange(B), token]  # [B]
        out[~done, step], out_logp[~done, step] = token[~done], logp[~done]
        done |= token == config.eos_id
        if done.all() or step + 1 == max_new_tokens:
            break
        logits = extend(params, config, cache, token)  # [B, V]
    return Generation(out, out_logp)


def beam_search(params, config: PaliGemmaConfig, cache: KVCache, logits, beam_size, max_new_tokens):
    """big_vision's beam search: sum of log-probabilities, no length normalisation.

    At each step every live beam may finish (append EOS); the best finished hypothesis per
    example is kept. Live beams grow by their best non-EOS tokens, the top `beam_size` of all
    candidates survive. Search stops when no live beam can still beat the best finished one
    (scores only fall) or at `max_new_tokens`.

    Args:
      cache, logits [B, V]: from `prefill`.
    Returns:
      `Generation` of the best finished hypothesis per example.
    """
    B, V = logits.shape
    beams, eos = beam_size, config.eos_id
    cache = cache.select(np.repeat(np.arange(B), beams))
    logits = np.repeat(logits, beams, axis=0)  # [B * beams, V]
    scores = np.full((B, beams), -np.inf)
    scores[:, 0] = 0.0  # one live beam to start with; the others are placeholders
    live = np.zeros((B, beams, 0), dtype=np.int64)  # live token sequences
    live_logp = np.zeros((B, beams, 0))
    best = np.full(B, -np.inf)
    best_tokens = np.full((B, max_new_tokens), config.pad_id, dtype=np.int64)
    best_logp = np.zeros((B, max_new_tokens))
    rows = np.arange(B)[:, None]  # [B, 1]
    for step in range(max_new_tokens):
        logp = log_softmax(logits.astype(np.float64)).reshape(B, beams, V)  # [B, beams, V]
        finished = scores + logp[..., eos]  # [B, beams]
        w = np.argmax(finished, axis=1)  # [B]
        for b in np.flatnonzero(finished[np.arange(B), w] > best):
            best[b] = finished[b, w[b]]
            best_tokens[b] = config.pad_id
            best_tokens[b, :step], best_tokens[b, step] = live[b, w[b]], eos
            best_logp[b] = 0.0
            best_logp[b, :step], best_logp[b, step] = live_logp[b, w[b]], logp[b, w[b], eos]
        if step + 1 == max_new_tokens:
            break
        candidates = scores[..., None] + logp  # [B, beams, V]
        candidates[..., eos] = -np.inf
        flat = candidates.reshape(B, beams * V)
        top = np.argsort(-flat, axis=1, kind="stable")[:, :beams]  # [B, beams]
        parent, token = top // V, top % V  # [B, beams]
        scores = np.take_along_axis(flat, top, axis=1)  # [B, beams]
        live = np.concatenate([live[rows, parent], token[..., None]], axis=-1)
        live_logp = np.concatenate([live_logp[rows, parent], logp[rows, parent, token][..., None]], axis=-1)
        if np.all(scores.max(axis=1) < best):
            break
        cache = cache.select((rows * beams + parent).reshape(-1))
        logits = extend(params, config, cache, token.reshape(-1))  # [B * beams, V]
    return Generation(best_tokens, best_logp)
