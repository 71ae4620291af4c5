"""Decoding in JAX (mirrors `paligemma.ref.decode`): prefill once, then one compiled loop.

The KV cache has a static shape: one slot per prompt token, then one per generated token;
validity and positions are per example, so prompts of different lengths need no
re-alignment. `generate` runs prefill and the whole token loop (`lax.while_loop`, stopping
as soon as every example has produced EOS) in one jitted program.

Axes: B batch, S cache slots, L layers, K kv heads, H head dim, V vocabulary.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from paligemma import kernels
from paligemma.ref.config import PaliGemmaConfig
from paligemma.ref.decode import Generation, Sampler, validate_generate_args
from paligemma.ref.model import num_image_tokens

from . import gemma, layout, sharding
from .mask import sliding_window
from .model import embed_image_and_text, jit_model, join_image_and_text, prefix_lm_masks
from .policy import FLOAT32, Policy


CACHE_ALIGNMENT = 128  # cache slots are a multiple of this for the Pallas kernels (any tile size divides it)


class KVCache(NamedTuple):
    """Keys and values of every layer plus per-example bookkeeping (a pytree)."""

    k: jax.Array  # [L, B, S, K, H]
    v: jax.Array  # [L, B, S, K, H]
    valid: jax.Array  # [B, S] bool
    positions: jax.Array  # [B, S] int32
    lengths: jax.Array  # [B] int32: real tokens so far = position of the next token
    next_slot: jax.Array  # [] int32, or [B] when each example writes at its own row (`fast.engine`)

    def select(self, rows):
        """A cache whose example b is example `rows[b]` of this one (beam reordering)."""
        return KVCache(self.k[:, rows], self.v[:, rows], self.valid[rows], self.positions[rows],
                       self.lengths[rows], self.next_slot)


def prefill(params, config: PaliGemmaConfig, images, tokens, mask_ar, input_mask, max_new_tokens, policy, rope,
            image_tokens=None):
    """Runs the prompt and fills the cache; returns (cache, logits [B, V] after each last real token).

    image_tokens: `embed_images`' output [B, P, D] computed earlier (then `images` is unused).
    """
    g, mesh = config.llm, policy.mesh
    if image_tokens is None:
        x, full_mask, full_ar = embed_image_and_text(params, config, images, tokens, mask_ar, input_mask, policy)
    else:
        x, full_mask, full_ar = join_image_and_text(params, config, image_tokens, tokens, mask_ar, input_mask, policy)
    x = sharding.constrain(x, mesh, sharding.batch_spec(3))  # [B, N, D]
    B, N, _ = x.shape
    S = N + max_new_tokens
    if policy.uses_kernels:  # whole kernel tiles: the kernels would otherwise pad (copy) the cache
        S = -(-S // CACHE_ALIGNMENT) * CACHE_ALIGNMENT
    attn_mask, local_mask, positions = prefix_lm_masks(config, full_mask, full_ar)
    token_mask = kernels.TokenMask.prefix_lm(full_mask, full_ar).pad_keys(S) if policy.uses_kernels else None
    pad = lambda m: None if m is None else jnp.pad(m, ((0, 0), (0, 0), (0, S - N)))  # noqa: E731
    kv_shape = (g.depth, B, S, g.num_kv_heads, g.head_dim)
    cache_spec = sharding.kv_cache_spec(mesh, g.num_kv_heads)
    k0, v0 = (sharding.constrain(jnp.zeros(kv_shape, policy.kv_dtype), mesh, cache_spec) for _ in "kv")
    pre_logits, (k, v) = gemma.transformer(params["llm"], x, positions, pad(attn_mask), g, policy, rope,
                                           pad(local_mask), (k0, v0, 0), token_mask)  # [B, N, D]
    k, v = sharding.constrain(k, mesh, cache_spec), sharding.constrain(v, mesh, cache_spec)  # [L, B, S, K, H]
    cache = KVCache(k, v, jnp.pad(full_mask, ((0, 0), (0, S - N))), jnp.pad(positions, ((0, 0), (0, S - N))),
                    full_mask.sum(axis=1).astype(jnp.int32), jnp.int32(N))
    last = N - 1 - jnp.argmax(full_mask[:, ::-1], axis=1)  # [B] index of the last real token
    last_pre_logits = pre_logits[jnp.arange(B), last][:, None]  # [B, 1, D]
    logits = gemma.logits(params["llm"], last_pre_logits, g, mesh)[:, 0]  # [B, V]
    return cache, sharding.constrain(logits, mesh, sharding.logits_spec(mesh, g.vocab_size, 2))


def extend(params, config: PaliGemmaConfig, cache: KVCache, tokens, policy, rope):
    """Feeds one token per example ([B]); returns (cache, logits [B, V] for the next token)."""
    g, mesh = config.llm, policy.mesh
    x = gemma.embed_tokens(params["llm"]["embedder"], tokens[:, None], policy.dtype, g.width)  # [B, 1, D]
    x = sharding.constrain(x, mesh, sharding.batch_spec(3))  # [B, 1, D]
    slot = cache.next_slot
    positions = cache.lengths[:, None]  # [B, 1]
    valid = gemma.write_rows(cache.valid, jnp.ones((len(tokens), 1), bool), slot)  # [B, S]
    key_positions = gemma.write_rows(cache.positions, positions, slot)  # [B, S]
    attn_mask = valid[:, None, :]  # [B, 1, S]
    local_mask = sliding_window(attn_mask, positions, key_positions, g.sliding_window)
    token_mask = None
    if policy.uses_kernels:  # the new token is a block of its own: it sees every valid slot
        B, S = valid.shape
        token_mask = kernels.TokenMask(jnp.ones((B, 1), jnp.int32), jnp.zeros((B, S), jnp.int32), jnp.ones((B, 1), bool),
                                       valid, positions, key_positions)
    pre_logits, (k, v) = gemma.transformer(params["llm"], x, positions, attn_mask, g, policy, rope, local_mask,
                                           (cache.k, cache.v, slot), token_mask)  # [B, 1, D]
    cache_spec = sharding.kv_cache_spec(mesh, g.num_kv_heads)
    k, v = sharding.constrain(k, mesh, cache_spec), sharding.constrain(v, mesh, cache_spec)  # [L, B, S, K, H]
    cache = KVCache(k, v, valid, key_positions, cache.lengths + 1, slot + 1)
    logits = gemma.logits(params["llm"], pre_logits, g, mesh)[:, 0]  # [B, V]
    return cache, sharding.constrain(logits, mesh, sharding.logits_spec(mesh, g.vocab_size, 2))


# --- Samplers (the reference's rules, with jax.random) ------------------------------------


def sampling_logits(logits, sampler: Sampler):
    """Temperature, then top-k or big_vision's nucleus cut; cut tokens get -inf. [B, V] -> [B, V]."""
    logits = logits / sampler.temperature
    if sampler.kind == "top_k":
        k = min(sampler.top_k, logits.shape[-1])
        kth = jnp.sort(logits, axis=-1)[:, -k][:, None]  # [B, 1]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    elif sampler.kind == "nucleus":
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
        cut = jnp.minimum(jnp.sum(cumulative < sampler.top_p, axis=-1), logits.shape[-1] - 1)  # [B]
        threshold = jnp.take_along_axis(ordered, cut[:, None], axis=-1)  # [B, 1]
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return logits


def sample(logits, sampler: Sampler, key):
    """Next token per example: [B, V] -> [B]."""
    if sampler.kind == "greedy":
        return jnp.argmax(logits, axis=-1)
    return jax.random.categorical(key, sampling_logits(logits, sampler), axis=-1)


# --- Generation ---------------------------------------------------------------------------


def _generate(params, images, tokens, mask_ar, input_mask, key, config, policy, max_new_tokens, sampler):
    rope = gemma.rope_table(num_image_tokens(config, images.shape) + tokens.shape[1] + max_new_tokens,
                            config.llm.head_dim, config.llm.rope_base)
    cache, logits = prefill(params, config, images, tokens, mask_ar, input_mask, max_new_tokens, policy, rope)
    if sampler.kind == "beam":
        return _beam_search(params, config, cache, logits, sampler.beam_size, max_new_tokens, policy, rope)
    B = tokens.shape[0]
    rows = jnp.arange(B)

    def cond(state):
        step, _, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, logits, out, out_logp, done, key = state
        key, sub = jax.random.split(key)
        token = sample(logits, sampler, sub).astype(jnp.int32)  # [B]
        logp = jax.nn.log_softmax(logits, axis=-1)[rows, token]  # [B]
        out = out.at[:, step].set(jnp.where(done, config.pad_id, token))
        out_logp = out_logp.at[:, step].set(jnp.where(done, 0.0, logp))
        done = done | (token == config.eos_id)
        more = (step + 1 < max_new_tokens) & ~jnp.all(done)
        cache, logits = jax.lax.cond(more, lambda: extend(params, config, cache, token, policy, rope),
                                     lambda: (cache, logits))
        return step + 1, cache, logits, out, out_logp, done, key

    state = (jnp.int32(0), cache, logits, jnp.full((B, max_new_tokens), config.pad_id, jnp.int32),
             jnp.zeros((B, max_new_tokens), jnp.float32), jnp.zeros(B, bool), key)
    _, _, _, out, out_logp, _, _ = jax.lax.while_loop(cond, body, state)
    return out, out_logp


_generate = jit_model(_generate, ("config", "policy", "max_new_tokens", "sampler"))


def _beam_search(params, config, cache, logits, beams, max_new_tokens, policy, rope):
    """big_vision's beam search (see `paligemma.ref.decode.beam_search`), in one while_loop."""
    B, V = logits.shape
    eos, pad = config.eos_id, config.pad_id
    cache = cache.select(jnp.repeat(jnp.arange(B), beams))
    logits = jnp.repeat(logits, beams, axis=0)  # [B * beams, V]
    rows = jnp.arange(B)[:, None]  # [B, 1]
    scores = jnp.full((B, beams), -jnp.inf).at[:, 0].set(0.0)

    def cond(state):
        return (state[0] < max_new_tokens) & ~state[-1]

    def body(state):
        step, cache, logits, scores, live, live_logp, best, best_tokens, best_logp, _ = state
        logp = jax.nn.log_softmax(logits, axis=-1).reshape(B, beams, V)  # [B, beams, V]
        finished = scores + logp[..., eos]  # [B, beams]
        w = jnp.argmax(finished, axis=1)  # [B]
        better = finished[rows[:, 0], w] > best  # [B]
        candidate = live[rows[:, 0], w].at[:, step].set(eos)  # [B, max_new]
        candidate_logp = live_logp[rows[:, 0], w].at[:, step].set(logp[rows[:, 0], w, eos])
        best = jnp.where(better, finished[rows[:, 0], w], best)
        best_tokens = jnp.where(better[:, None], candidate, best_tokens)
        best_logp = jnp.where(better[:, None], candidate_logp, best_logp)

        candidates = (scores[..., None] + logp).at[..., eos].set(-jnp.inf).reshape(B, beams * V)
        scores, top = jax.lax.top_k(candidates, beams)  # [B, beams], ties: lower index first
        parent, token = top // V, (top % V).astype(jnp.int32)
        live = live[rows, parent].at[:, :, step].set(token)
        live_logp = live_logp[rows, parent].at[:, :, step].set(logp[rows, parent, token])
        stop = (step + 1 >= max_new_tokens) | jnp.all(scores.max(axis=1) < best)
        cache = cache.select((rows * beams + parent).reshape(-1))
        cache, logits = jax.lax.cond(stop, lambda: (cache, logits),
                                     lambda: extend(params, config, cache, token.reshape(-1), policy, rope))
        return step + 1, cache, logits, scores, live, live_logp, best, best_tokens, best_logp, stop

    state = (jnp.int32(0), cache, logits, scores, jnp.full((B, beams, max_new_tokens), pad, jnp.int32),
             jnp.zeros((B, beams, max_new_tokens), jnp.float32), jnp.full(B, -jnp.inf),
             jnp.full((B, max_new_tokens), pad, jnp.int32), jnp.zeros((B, max_new_tokens), jnp.float32),
             jnp.bool_(False))
    state = jax.lax.while_loop(cond, body, state)
    return state[7], state[8]


def generate(params, config: PaliGemmaConfig, images, tokens, mask_ar, input_mask=None,
             max_new_tokens=32, sampler="greedy", seed=0, policy: Policy = FLOAT32, mesh=None):
    """The reference's `generate`, compiled: returns `Generation(tokens, logprobs)` (NumPy).

    Sampling draws from `jax.random.PRNGKey(seed)`, so it is reproducible but not the same
    stream as the reference's NumPy generator; greedy and beam search give the same tokens.
    mesh: None (one device; or `policy.mesh`), a `jax.sharding.Mesh` or a description such as
    "data=2,model=4" (`fast.sharding`): parameters not yet on it are placed by the rule table
    (`sharding.place_params`; place them once yourself to avoid doing it per call), examples are
    split over data and fsdp (the batch padded with copies of its last example to a multiple).
    params: either layout, NumPy or device arrays; they run in this platform's layout
    (`layout.for_platform`: per-layer buffers for float32 weights on the CPU, converted once).
    """
    images, tokens, mask_ar, input_mask, sampler = validate_generate_args(
        config, images, tokens, mask_ar, input_mask, max_new_tokens, sampler)
    inputs = [images, tokens.astype(np.int32), mask_ar.astype(np.int32), input_mask]
    params, inputs, policy = sharding.on_mesh(params, inputs, policy, mesh)
    params = layout.for_platform(params, policy.mesh)
    out, logp = _generate(params, *inputs, jax.random.PRNGKey(seed), config, policy, int(max_new_tokens), sampler)
    out, logp = (x[: len(tokens)] for x in sharding.to_host((out, logp)))
    return Generation(out.astype(np.int64), logp.astype(np.float64))
