"""What a client asks the engine (`Request`), and the checks every request passes before any work.

    request, sampler = checked(Request(pixels, prompt_ids, max_new_tokens=32), config, max_seq)

`checked` refuses (AdmissionError, naming the problem and, for a request that cannot fit, both
numbers) what the engine could never serve, so that a bad request costs nothing and nobody else.
"""

import dataclasses
from typing import Any

import numpy as np

from paligemma.ref.decode import check_context, parse_sampler
from paligemma.ref.model import num_image_tokens

from .pool import SAMPLER_KINDS

__all__ = ["Request", "AdmissionError", "QueueFull", "checked"]


class AdmissionError(ValueError):
    """A request the engine can never serve (too long, malformed); raised by `submit`, before any work."""


class QueueFull(RuntimeError):
    """`max_queue` requests are waiting already; try again later."""


@dataclasses.dataclass(frozen=True, eq=False)  # arrays inside: compared by identity
class Request:
    """One generation.

    images: float [R, R, 3] in [-1, 1] (`ref.preprocess`), or [F, R, R, 3] for several images or
      a video's frames in one prompt (F x P image tokens).
    tokens: int [T], the prompt `[BOS] prefix "\\n"` (+ a forced suffix) without padding.
    mask_ar: int [T], 0 = prefix (bidirectional), 1 = suffix (causal); None = all prefix.
    sampler: "greedy", "temperature(t)", "top_k(k[, t])", "nucleus(p[, t])" or a `Sampler`.
    stop_ids: token ids that end the answer (included in it) besides EOS.
    """

    images: Any
    tokens: Any
    mask_ar: Any = None
    max_new_tokens: int = 32
    sampler: Any = "greedy"
    seed: int = 0
    stop_ids: tuple = ()


def checked(request, config, max_seq):
    """(the request with its arrays as numpy int32 / float32, its parsed `Sampler`), or AdmissionError."""
    if not isinstance(request, Request):
        raise AdmissionError(f"submit: expected a Request, got {type(request).__name__}")
    cfg, R = config, config.vision.image_size
    images = np.asarray(request.images, np.float32)
    if images.ndim not in (3, 4) or images.shape[-3:] != (R, R, 3):
        raise AdmissionError(f"images: expected [{R}, {R}, 3] or [F, {R}, {R}, 3], got {list(images.shape)}")
    tokens = np.asarray(request.tokens)
    if tokens.ndim != 1 or not len(tokens) or not np.issubdtype(tokens.dtype, np.integer):
        raise AdmissionError(f"tokens: expected a non-empty 1-D integer array, got {tokens.dtype} {list(tokens.shape)}")
    if tokens.min() < 0 or tokens.max() >= cfg.llm.vocab_size:
        raise AdmissionError(f"tokens: ids must be in [0, {cfg.llm.vocab_size}), got {tokens.min()}..{tokens.max()}")
    mask_ar = np.zeros_like(tokens) if request.mask_ar is None else np.asarray(request.mask_ar)
    if mask_ar.shape != tokens.shape:
        raise AdmissionError(f"mask_ar: expected shape {list(tokens.shape)}, got {list(mask_ar.shape)}")
    n = request.max_new_tokens
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise AdmissionError(f"max_new_tokens: expected an integer >= 1, got {n!r}")
    sampler = parse_sampler(request.sampler)
    if sampler.kind not in SAMPLER_KINDS:
        raise AdmissionError(f"sampler {sampler.kind}: the engine serves {', '.join(SAMPLER_KINDS)} "
                             "(beam search: fast.generate)")
    P = num_image_tokens(cfg, images[None].shape)
    need = P + len(tokens) + int(n)
    what = f"{P} image tokens + {len(tokens)} prompt tokens + {int(n)} new tokens"
    check_context(need, f"request: {what}", AdmissionError)
    if need > max_seq:
        raise AdmissionError(f"request: {what} = {need} positions, more than this engine's max_seq {max_seq}")
    stops = tuple(int(t) for t in request.stop_ids)
    return dataclasses.replace(request, images=images, tokens=tokens.astype(np.int32),
                               mask_ar=mask_ar.astype(np.int32), stop_ids=stops), sampler
