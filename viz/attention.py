"""Where each answer token looked: the reference's attention probabilities, picked out per token.

    ex = explain_ids(params, config, pixels, tokens, mask_ar)   # float64 params: the gold standard
    ex.rows        [A, L, N, S]   attention of the query that produced answer token a, every key
    ex.image_maps  [A, L, N, P]   the same, image keys only (patches in row-major grid order)
    ex.attn_mask   [S, S]         who may see whom (`paligemma.ref.make_attn_mask`)

Axes: A answer tokens, L language-model layers, N query heads, S = P + T + A sequence positions
(image tokens, prompt, answer), P image tokens, T prompt tokens ([BOS] prefix "\\n").

Which query row belongs to answer token a? The one that *produced* it: the query at the "\\n"
separator chose answer token 0, the query at answer token a - 1 chose answer token a. So
`ex.query_positions[a] = P + T - 1 + a`, and the map of a token is what the model looked at
when it picked that token. The answer is generated first (greedy, `ref.generate` with its KV
cache), then fed back in one forward pass with every `llm/block_NN/attn_probs` recorded; the
tests hold these rows against the ones the cached decoding records step by step.
"""

import dataclasses

import numpy as np

from paligemma import ref
from paligemma.ref import capture
from paligemma.ref.model import prefix_lm_masks
from paligemma.ref.gemma import uses_sliding_window


@dataclasses.dataclass(frozen=True)
class Explanation:
    """One image, one prompt, its answer and the attention behind each answer token."""

    tokens: np.ndarray  # [T + A] int: the prompt, then the answer (EOS included when produced)
    prompt_len: int  # T
    num_image_tokens: int  # P
    rows: np.ndarray  # [A, L, N, S] float64
    attn_mask: np.ndarray  # [S, S] bool: global layers
    local_mask: np.ndarray | None  # [S, S] bool: sliding-window layers, None without a window
    local_layers: tuple  # the layers that use `local_mask`

    @property
    def answer(self):
        """[A] int: the generated ids."""
        return self.tokens[self.prompt_len:]

    @property
    def query_positions(self):
        """[A] int: the sequence position whose query produced each answer token."""
        return self.num_image_tokens + self.prompt_len - 1 + np.arange(len(self.answer))

    @property
    def image_maps(self):
        """[A, L, N, P]: each answer token's attention over the image tokens."""
        return self.rows[..., : self.num_image_tokens]

    def layer_mask(self, layer):
        """[S, S] bool: the mask layer `layer` used."""
        return self.local_mask if layer in self.local_layers else self.attn_mask


class _QueryRows(dict):
    """A recorder's store that keeps, of each [B, N, T, S] probability tensor, only the rows of the
    queries that chose answer tokens: a 4096-token prefix would otherwise hold L x N x S x S floats."""

    def __init__(self, queries):
        super().__init__()
        self.queries = queries

    def __setitem__(self, name, value):
        super().__setitem__(name, value[:, :, self.queries])  # [B, N, A, S]


def sequence_masks(config, tokens, mask_ar, num_image_tokens):
    """The masks of one sequence [image ; tokens]: (global [S, S], local [S, S] or None).

    Args:
      config: a `PaliGemmaConfig`.
      tokens: [T] ids (only the length is used); mask_ar: [T] int.
      num_image_tokens: P.
    """
    T, P = len(tokens), num_image_tokens
    input_mask = np.ones((1, P + T), dtype=bool)
    full_ar = np.concatenate([np.zeros(P, np.int64), np.asarray(mask_ar, np.int64)])[None]  # [1, P+T]
    attn_mask, local_mask, _ = prefix_lm_masks(config, input_mask, full_ar)
    return attn_mask[0], None if local_mask is None else local_mask[0]


def explain_ids(params, config, pixels, tokens, mask_ar, max_new_tokens=32, answer=None):
    """Generates an answer greedily and records the attention that produced each of its tokens.

    Args:
      params: `paligemma.ref` parameters (float64 for the gold standard).
      config: the `PaliGemmaConfig`.
      pixels: [R, R, 3] float in [-1, 1], one preprocessed image.
      tokens: [T] int prompt ids, `[BOS] prefix "\\n"`; mask_ar: [T] int (0 prefix, 1 forced suffix).
      max_new_tokens: at most this many answer tokens (EOS included).
      answer: optional [A] ids to explain instead of generating (teacher forcing).
    Returns:
      `Explanation`.
    """
    pixels = np.asarray(pixels)[None]  # [1, R, R, 3]
    tokens = np.asarray(tokens, np.int64)
    mask_ar = np.asarray(mask_ar, np.int64)
    if tokens.ndim != 1 or tokens.shape != mask_ar.shape or not len(tokens):
        raise ValueError(f"tokens, mask_ar: expected two equal non-empty [T] arrays, got "
                         f"{list(tokens.shape)} and {list(mask_ar.shape)}")
    if answer is None:
        out = ref.generate(params, config, pixels, tokens[None], mask_ar[None], max_new_tokens=max_new_tokens)
        answer = out.tokens[0, : int(out.lengths(config.eos_id)[0])]  # [A], EOS kept
    answer = np.asarray(answer, np.int64)
    if answer.ndim != 1 or not len(answer):
        raise ValueError(f"answer: expected at least one token, got shape {list(answer.shape)}")
    seq = np.concatenate([tokens, answer])  # [T + A]
    seq_ar = np.concatenate([mask_ar, np.ones_like(answer)])  # the answer is causal
    names = [f"{capture.block_name('llm', i)}/{capture.PROBS}" for i in range(config.llm.depth)]
    P = config.vision.num_patches
    queries = P + len(tokens) - 1 + np.arange(len(answer))  # [A]
    with capture.recording(names) as rec:
        rec.values = _QueryRows(queries)
        ref.forward(params, config, pixels, seq[None], seq_ar[None])
    rows = np.stack([rec.values[n][0] for n in names], axis=1)  # [N, L, A, S]
    rows = np.transpose(rows, (2, 1, 0, 3))  # [A, L, N, S]
    attn_mask, local_mask = sequence_masks(config, seq, seq_ar, P)
    local = tuple(i for i in range(config.llm.depth) if uses_sliding_window(config.llm, i))
    return Explanation(seq, len(tokens), P, rows, attn_mask, local_mask, local)


def parse_layer(text, depth):
    """`--layer`: "all" -> every layer, "-1" -> the last, "2" -> (2,). Raises ValueError."""
    if str(text) == "all":
        return tuple(range(depth))
    try:
        layer = int(text)
    except ValueError:
        raise ValueError(f"--layer: expected a layer number or 'all', got {text!r}") from None
    if not -depth <= layer < depth:
        raise ValueError(f"--layer {text}: the model has {depth} layers (0..{depth - 1}, or -1 for the last)")
    return (layer % depth,)


def parse_head(text, num_heads):
    """`--head`: "mean" -> None (the mean over heads), "3" -> 3. Raises ValueError."""
    if str(text) == "mean":
        return None
    try:
        head = int(text)
    except ValueError:
        raise ValueError(f"--head: expected a head number or 'mean', got {text!r}") from None
    if not 0 <= head < num_heads:
        raise ValueError(f"--head {text}: the model has {num_heads} query heads (0..{num_heads - 1})")
    return head


def shown_maps(ex: Explanation, layers, head, grid):
    """The maps that are drawn: [A, len(layers), grid, grid].

    Args:
      layers: layer indices; head: a query head, or None for the mean over heads.
      grid: patches per side (the image tokens are a row-major grid x grid).
    """
    maps = ex.image_maps[:, list(layers)]  # [A, l, N, P]
    maps = maps.mean(axis=2) if head is None else maps[:, :, head]  # [A, l, P]
    return maps.reshape(maps.shape[:2] + (grid, grid))
