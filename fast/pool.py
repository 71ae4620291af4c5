"""The compiled programs of `fast.engine` over its pool of slots: encode an image, admit requests
(prefill into free rows of the pool's cache), decode one token for every slot, each row sampled
by its own sampler and random stream.

Axes: B slots (or the b requests of an admission), S cache columns, V vocabulary, P image
tokens, T text tokens, D width.
"""

import jax
import jax.numpy as jnp

from . import gemma
from .decode import KVCache, extend, prefill
from .model import embed_images, jit_model

GREEDY, TEMPERATURE, TOP_K, NUCLEUS = range(4)
SAMPLER_KINDS = {"greedy": GREEDY, "temperature": TEMPERATURE, "top_k": TOP_K, "nucleus": NUCLEUS}


def sample_rows(logits, kinds, temperature, top_k, top_p, keys):
    """Each row's next token by its own sampler and random stream: [B, V] -> ([B], new keys [B, 2]).

    Row b computes what `fast.decode.sample` computes for that request alone (same cut rules,
    same `categorical` on a [1, V] row), so seeded answers are the same tokens. Rows go one at a
    time (`lax.map`) so that each pays only for its own sampler: a greedy row is one argmax, while
    a [V] draw of Gumbel noise costs ~4 ms per row at PaliGemma's 257152 tokens (34 ms for 8 rows
    on the 2-core CPU harness, a sixth of a decode step) and top-k / nucleus add a sort.
    """
    B, V = logits.shape
    pairs = jax.vmap(jax.random.split)(keys)  # [B, 2, 2]
    keys, subs = pairs[:, 0], pairs[:, 1]

    def cut(scaled, kind, k, p):  # [V] -> [V]: below the row's threshold -> -inf
        ordered = jnp.sort(scaled)[::-1]  # [V] descending
        kth = ordered[jnp.clip(k - 1, 0, V - 1)]
        cumulative = jnp.cumsum(jax.nn.softmax(ordered))  # [V]
        nucleus = ordered[jnp.minimum(jnp.sum(cumulative < p), V - 1)]
        threshold = jnp.where(kind == TOP_K, kth, nucleus)
        return jnp.where(scaled >= threshold, scaled, -jnp.inf)

    def draw(row):
        logit, kind, t, k, p, sub = row  # logit [V]
        scaled = logit / t  # [V]
        scaled = jax.lax.cond((kind == TOP_K) | (kind == NUCLEUS), cut, lambda s, *_: s, scaled, kind, k, p)
        return jax.random.categorical(sub, scaled[None], axis=-1)[0].astype(jnp.int32)

    def one(row):
        return jax.lax.cond(row[1] == GREEDY, lambda r: jnp.argmax(r[0]).astype(jnp.int32), draw, row)

    return jax.lax.map(one, (logits, kinds, temperature, top_k, top_p, subs)), keys  # [B]


def choose(logits, samplers, keys):
    """(tokens [B], their log-probabilities [B], new keys) from logits [B, V]."""
    tokens, keys = sample_rows(logits, *samplers, keys)
    logp = jax.nn.log_softmax(logits, axis=-1)[jnp.arange(len(tokens)), tokens]  # [B]
    return tokens, logp, keys


def encode(params, images, config, policy):
    return embed_images(params["img"], config, images, policy)  # [1, F*P, D]


def admit(params, cache, rows, image_tokens, tokens, mask_ar, input_mask, samplers, keys, config, policy):
    """Prefills b requests and writes them into cache rows `rows` [b] (out of range: dropped)."""
    S = cache.valid.shape[1]
    N = image_tokens.shape[1] + tokens.shape[1]
    rope = gemma.rope_table(S, config.llm.head_dim, config.llm.rope_base)
    new, logits = prefill(params, config, None, tokens, mask_ar, input_mask, S - N, policy, rope,
                          image_tokens=image_tokens)  # new: [L, b, S, K, H], logits [b, V]
    put = lambda full, part, axis: full.at[(slice(None),) * axis + (rows,)].set(part, mode="drop")  # noqa: E731
    # Decoding writes each row after its real tokens (left-aligned), over the bucket's padding.
    cache = KVCache(put(cache.k, new.k, 1), put(cache.v, new.v, 1), put(cache.valid, new.valid, 0),
                    put(cache.positions, new.positions, 0), put(cache.lengths, new.lengths, 0),
                    put(cache.next_slot, new.lengths, 0))
    return (cache, *choose(logits, samplers, keys))


def decode(params, cache, tokens, active, samplers, keys, config, policy):
    """One token for every slot: the active ones advance, the free ones are left as they were."""
    rope = gemma.rope_table(cache.valid.shape[1], config.llm.head_dim, config.llm.rope_base)
    new, logits = extend(params, config, cache, tokens, policy, rope)  # logits [B, V]
    cache = new._replace(lengths=jnp.where(active, new.lengths, cache.lengths),
                         next_slot=jnp.where(active, new.next_slot, cache.next_slot))
    tokens, logp, new_keys = choose(logits, samplers, keys)
    return cache, tokens, logp, jnp.where(active[:, None], new_keys, keys)


_decode_all = decode  # the function itself, traced inside `decode_rows` (the name is jitted below)


def decode_rows(params, cache, rows, tokens, active, samplers, keys, config, policy):
    """`decode` for the b slots `rows` [b] only (distinct; tokens, active, samplers and keys are
    theirs): their cache rows are taken out, advanced and put back, the other slots are left as they
    were. Every row still reads all the weights, but on the CPU a step's cost grows with its rows
    (the tied-embedding logits alone: 67 ms at 1 row, 107 ms at 8 on the 3B harness), so a pool
    with few active slots steps at the cost of its active rows, not of all its slots."""
    part = KVCache(cache.k[:, rows], cache.v[:, rows], *(a[rows] for a in cache[2:]))  # k, v [L, b, S, K, H]
    part, tokens, logp, keys = _decode_all(params, part, tokens, active, samplers, keys, config, policy)
    cache = KVCache(cache.k.at[:, rows].set(part.k), cache.v.at[:, rows].set(part.v),
                    *(a.at[rows].set(p) for a, p in zip(cache[2:], part[2:])))
    return cache, tokens, logp, keys


encode = jit_model(encode, ("config", "policy"))
admit = jit_model(admit, ("config", "policy"), donate_argnames=("cache",))
decode_rows = jit_model(decode_rows, ("config", "policy"), donate_argnames=("cache",))
decode = jit_model(decode, ("config", "policy"), donate_argnames=("cache",))
