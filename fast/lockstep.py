"""The engine across several JAX processes: process 0 schedules, every process runs the same steps.

JAX's multi-controller runtime runs one program in every process: each must call the same
compiled programs, in the same order, with the same global inputs. What the engine does at a
step depends on which requests have arrived and which were cancelled, and only process 0 (the
one that receives them, e.g. `paligemma serve`'s HTTP server) knows that. So at every step
process 0 sends its plan, and every process applies it:

    plan = (slots cancelled, requests admitted into which slots: pixels, prompt, sampler, seed, ...)

Everything else follows from the same computation on every process: the sampled tokens (gathered
to every host), the slots freed at EOS, a stop id or max_new_tokens, the image cache's hits. A
step with nothing to admit or cancel (most decode steps) sends only a 2-number header.

Plans travel as an `.npz` (read with `allow_pickle=False`) through
`jax.experimental.multihost_utils.broadcast_one_to_all` (a collective over every device):
first a header [kind, bytes], then the bytes padded to a power of two, so that the broadcast
compiles for a few lengths only. An idle leader sends an empty plan every `IDLE_SECONDS`, so no
follower sits in a collective long enough for the collectives library to give up.
"""

import io

import numpy as np

from paligemma.ref.decode import Sampler

STOP, STEP = 0, 1
IDLE_SECONDS = 5.0
MIN_BYTES = 1024


def encode_plan(cancelled, group):
    """`.npz` bytes of one step's plan, or b"" for a step with nothing to cancel or admit.

    Args:
      cancelled: slot indices freed by a cancel this step.
      group: [(slot, (request, sampler, stream))] admitted this step (as `Engine._take_group`).
    """
    if not cancelled and not group:
        return b""
    arrays = {"cancelled": np.asarray(cancelled, np.int32), "slots": np.asarray([b for b, _ in group], np.int32)}
    for i, (_, (request, sampler, _)) in enumerate(group):
        arrays[f"images{i}"] = np.asarray(request.images, np.float32)
        arrays[f"tokens{i}"] = np.asarray(request.tokens, np.int32)
        arrays[f"mask_ar{i}"] = np.asarray(request.mask_ar, np.int32)
        arrays[f"stop_ids{i}"] = np.asarray(request.stop_ids, np.int64)
        arrays[f"ints{i}"] = np.asarray([request.max_new_tokens, request.seed, sampler.top_k], np.int64)
        arrays[f"floats{i}"] = np.asarray([sampler.temperature, sampler.top_p], np.float64)
        arrays[f"kind{i}"] = np.asarray(sampler.kind)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_plan(data, make_request):
    """(cancelled, [(slot, (request, sampler))]) from `encode_plan`'s bytes.

    `make_request(**fields)` builds the request (the engine passes its `Request`).
    """
    if not data:
        return [], []
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        group = []
        for i, b in enumerate(z["slots"].tolist()):
            max_new, seed, top_k = z[f"ints{i}"].tolist()
            temperature, top_p = z[f"floats{i}"].tolist()
            sampler = Sampler(kind=str(z[f"kind{i}"]), temperature=temperature, top_k=top_k, top_p=top_p)
            request = make_request(images=z[f"images{i}"], tokens=z[f"tokens{i}"], mask_ar=z[f"mask_ar{i}"],
                                   max_new_tokens=max_new, sampler=sampler, seed=seed,
                                   stop_ids=tuple(z[f"stop_ids{i}"].tolist()))
            group.append((b, (request, sampler)))
        return z["cancelled"].tolist(), group


def _broadcast(array):
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(array))


def send(kind, data=b""):
    """Process 0: one plan to every other process (they must be in `receive`)."""
    _broadcast(np.asarray([kind, len(data)], np.int32))
    if data:
        _broadcast(_padded(data))


def receive():
    """Processes 1..N-1: (kind, plan bytes) as process 0 sent them."""
    kind, size = _broadcast(np.zeros(2, np.int32)).tolist()
    if not size:
        return kind, b""
    return kind, _broadcast(np.zeros_like(_padded(bytes(size)))).view(np.uint8)[:size].tobytes()


def _padded(data):
    """The bytes as int32 words (collectives sum them; every other process sends zeros), padded
    to a power of two of at least MIN_BYTES."""
    size = max(MIN_BYTES, 1 << (len(data) - 1).bit_length())
    words = np.zeros(size // 4, np.int32)
    words.view(np.uint8)[: len(data)] = np.frombuffer(data, np.uint8)
    return words
