"""Generated ids to what a client reads: streamed text, stop sequences, detected objects and masks.

    text = TextStream(tokenizer, eos_id, stops=("\\n",))
    for token in tokens:
        delta = text.push(token)      # the new text safe to send ("" while it could still change)
        if text.stopped: break        # a stop sequence appeared: cancel the generation
    delta = text.finish()             # whatever was held back; text.text is the whole answer

    objects = find_objects("detect cat", text.text, height, width, vae)   # dicts, masks as RLE + PNG

Text is the tokenizer's decoding of all ids so far (as `paligemma generate` decodes its answer),
so the streamed pieces add up to exactly the non-streamed text. A piece is held back while it
ends in an incomplete UTF-8 character or could be the start of a stop sequence.
"""

import base64
import io

import numpy as np

TASKS = ("detect", "segment")
_REPLACEMENT = "\ufffd"  # what a partial multi-byte character decodes to


class TextStream:
    """Incremental text of a generation, cut at EOS or at the first stop sequence."""

    def __init__(self, tokenizer, eos_id, stops=()):
        self.tokenizer, self.eos_id, self.stops = tokenizer, eos_id, tuple(stops)
        self.ids, self.sent, self.text, self.stopped, self.ended = [], "", "", False, False

    def push(self, token):
        """Adds one generated id; returns the text that may now be sent."""
        if self.stopped or self.ended:
            return ""
        if int(token) == self.eos_id:
            self.ended = True
            return self.finish()
        self.ids.append(int(token))
        self.text = self.tokenizer.decode(self.ids, stop_at_eos=False)
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = self.text[:cut], True
            return self.finish()
        hold = max([len(self.text) - len(self.text.rstrip(_REPLACEMENT))] +
                   [k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])])
        return self._send(self.text[:len(self.text) - hold])

    def finish(self):
        """Everything not yet sent (call once the generation has ended)."""
        return self._send(self.text)

    def _send(self, upto):
        # Decoding more ids can rewrite the tail (rare in SentencePiece); then wait for the end.
        if len(upto) <= len(self.sent) or not upto.startswith(self.sent):
            return ""
        delta, self.sent = upto[len(self.sent):], upto
        return delta


def task_of(prompt):
    """"detect" or "segment" for prompts of those tasks, else None."""
    word = prompt.strip().split(" ", 1)[0].lower()
    return word if word in TASKS else None


def run_length(mask):
    """Row-major runs of a bool [H, W] mask, alternating 0 and 1, the first run of 0s (maybe empty);
    the same encoding as `paligemma generate`'s JSON output (docs/tasks.md)."""
    flat = np.asarray(mask, bool).reshape(-1)
    edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # where a new run begins
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0] + runs if flat.size and flat[0] else runs


def mask_png(mask):
    """A data URL of a PNG, white where the [H, W] soft mask is > 0.5, transparent elsewhere."""
    from PIL import Image

    alpha = np.where(np.asarray(mask) > 0.5, 255, 0).astype(np.uint8)  # [H, W]
    rgba = np.concatenate([np.full(alpha.shape + (3,), 255, np.uint8), alpha[..., None]], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def find_objects(prompt, text, height, width, vae=None):
    """The parsed objects of a detect / segment answer as JSON-ready dicts (None for other prompts).

    Each: {"label", "box": [y0, x0, y1, x1] pixels of the original image (half-open), "loc" (the
    loc values), "errors", "text" (the part of the answer read: raw tokens and label), and for
    segment "seg" (the 16 codes) plus "mask": null without a VAE, else {"area", "rle", "png"}}.
    """
    from paligemma.ref.tasks.answers import paste_mask, parse

    task = task_of(prompt)
    if task is None:
        return None
    objects = parse(text, height, width, require_seg=task == "segment").objects
    records = [{**o.to_dict(), "text": o.text} for o in objects]  # text: the raw <loc>/<seg> tokens and label
    if task != "segment":
        return records
    todo = [i for i, o in enumerate(objects) if o.has_mask_codes and o.box is not None]
    for record in records:
        record["mask"] = None
    if vae is not None and todo:
        from paligemma.fast.vqvae import decode

        masks64 = np.asarray(decode(vae, np.array([objects[i].seg for i in todo])))  # [n, 64, 64]
        for i, m in zip(todo, masks64):
            mask = paste_mask(m, objects[i].box, height, width)  # [H, W] in [0, 1]
            binary = mask > 0.5
            records[i]["mask"] = {"area": int(binary.sum()), "rle": run_length(binary), "png": mask_png(mask)}
    return records
