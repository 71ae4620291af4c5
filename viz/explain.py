"""`paligemma explain` behind the command line: explain one (image, prompt) and write the pictures.

    from paligemma.viz.explain import load_model, explain_image, write_explanation
    model = load_model("demo-model.npz", "demo-tokenizer.model")          # float64 reference
    ex, rgb = explain_image(model, "scene.png", "detect circle")
    files = write_explanation("out/", model, ex, rgb, "detect circle", layer="all", head="mean")

What lands in OUT (the arrays behind every picture are in the .npz files):

    index.html       the page: image, answer tokens, the map of the token under the cursor
    image.png        the image as the model sees it (squashed to a square), enlarged
    objects.png      detect / segment prompts: the boxes and masks drawn on image.png
    mask.png         the prefix-LM mask of the whole sequence, blocks labelled  (mask.npz)
    token_NN.png     answer token NN's attention over the image, per chosen layer (attention.npz)
    strip.png        every answer token's map in one strip                      (attention.npz)
    objects.npz      boxes [n, 4] (display pixels, y0 x0 y1 x1) and masks [n, D, D]
"""

import dataclasses
import os

import numpy as np
from PIL import Image

from paligemma import ref
from paligemma.ref.tasks.draw import draw_objects, save_png

from .attention import explain_ids, parse_layer, parse_head, shown_maps
from .heatmap import display_image, strip, token_picture
from .mask_picture import draw_mask
from .page import write_page


@dataclasses.dataclass(frozen=True)
class Model:
    """A model for explaining: reference parameters (float64 by default), config, tokenizer and VAE."""

    config: object
    params: dict
    tokenizer: ref.Tokenizer
    vae: dict | None = None


def load_model(checkpoint, tokenizer, vae=None, dtype="float64"):
    """Reads a checkpoint (any format `paligemma.ref.load` reads) with its tokenizer.

    dtype: "float64" (the gold standard, the default) or "float32" (half the memory: a 3B
    checkpoint takes ~12 GB instead of ~24 GB).

    Raises:
      ValueError for unreadable or mismatched files.
    """
    if dtype not in ("float64", "float32"):
        raise ValueError(f"dtype: expected 'float64' or 'float32', got {dtype!r}")
    from paligemma.fast.pipeline import fit_vocab  # the same vocabulary check `generate` makes

    tok = ref.Tokenizer(os.fspath(tokenizer))
    config, params = fit_vocab(*ref.load(checkpoint), tok)
    if any(k.endswith("/q") for k in ref.flatten(params)):
        raise ValueError(f"{checkpoint}: a quantized checkpoint; explain needs float weights (the float64 reference)")
    vae_params = None
    if vae is not None:
        from paligemma.ref.vqvae import load_vae

        vae_params = load_vae(vae)
    return Model(config, ref.cast_params(params, np.dtype(dtype)), tok, vae_params)


def explain_image(model: Model, image, prompt, max_new_tokens=32):
    """Generates the answer to `prompt` about `image` and records its attention.

    Returns:
      `(Explanation, rgb)`: rgb is the decoded image, uint8 [H, W, 3].
    """
    rgb = ref.load_image(image)  # [H, W, 3]
    pixels = ref.preprocess(rgb, model.config.vision.image_size).astype(np.float64)  # [R, R, 3], cast by forward
    p = model.tokenizer.prompt(prompt)
    return explain_ids(model.params, model.config, pixels, p.tokens, p.mask_ar, max_new_tokens), rgb


def token_text(tokenizer, i):
    """One token as text for a label: its decoded text, "<eos>", or "<id N>" if it decodes to nothing."""
    if int(i) == tokenizer.eos_id:
        return "<eos>"
    return tokenizer.decode([int(i)], stop_at_eos=False) or f"<id {int(i)}>"


def sequence_blocks(ex):
    """The blocks of the sequence for the mask picture: image | prefix | separator | answer."""
    P, T, A = ex.num_image_tokens, ex.prompt_len, len(ex.answer)
    blocks = [("image", 0, P), ("prefix", P, P + T - 1), ("sep \\n", P + T - 1, P + T), ("answer", P + T, P + T + A)]
    return [b for b in blocks if b[2] > b[1]]


def _objects(model, task, answer_text, side):
    """Parsed boxes and masks on the display image: (objects, masks) or a note why none."""
    from paligemma.ref.tasks.answers import parse, paste_mask

    objects = [o for o in parse(answer_text, side, side, require_seg=task == "segment").objects if o.box]
    masks = []
    for obj in objects:
        mask = None
        if task == "segment" and obj.has_mask_codes and model.vae is not None:
            from paligemma.ref.vqvae import decode

            mask = paste_mask(decode(model.vae, np.array([obj.seg]))[0], obj.box, side, side)
        masks.append(mask)
    return objects, masks


def write_explanation(out, model: Model, ex, rgb, prompt, layer="-1", head="mean"):
    """Writes the pictures, arrays and page of one explanation into folder `out`.

    Args:
      layer: "all", or a layer number (-1: the last); head: "mean" or a query head number.
    Returns:
      dict: name -> path of each file written.
    Raises:
      ValueError for a bad layer or head.
    """
    config, tok = model.config, model.tokenizer
    layers, head_index = parse_layer(layer, config.llm.depth), parse_head(head, config.llm.num_heads)
    os.makedirs(out, exist_ok=True)
    files = {}

    def path(name):
        files[name] = os.path.join(out, name)
        return files[name]

    grid = config.vision.grid
    display = display_image(rgb, grid)  # [D, D, 3]
    save_png(path("image.png"), Image.fromarray(display))
    pieces = [token_text(tok, i) for i in ex.answer]
    answer_text = tok.decode(ex.answer)

    blocks = sequence_blocks(ex)
    picture, geometry = draw_mask(ex.attn_mask, blocks, ex.local_mask, config.llm.sliding_window)
    save_png(path("mask.png"), picture)
    mask_arrays = dict(attn_mask=ex.attn_mask, **geometry, block_labels=np.array([b[0] for b in blocks]),
                       block_starts=np.array([b[1] for b in blocks]), block_stops=np.array([b[2] for b in blocks]))
    if ex.local_mask is not None:
        mask_arrays.update(local_mask=ex.local_mask, local_layers=np.array(ex.local_layers))
    np.savez(path("mask.npz"), **mask_arrays)

    shown = shown_maps(ex, layers, head_index, grid)  # [A, l, g, g]
    head_name = "mean over heads" if head_index is None else f"head {head_index}"
    captions = [f"layer {i}, {head_name}" for i in layers]
    maps = []
    for a, piece in enumerate(pieces):
        name = f"token_{a:02d}.png"
        title = f"answer token {a}: {piece!r}"
        save_png(path(name), token_picture(display, shown[a], title, captions))
        maps.append(name)
    summary = shown.mean(axis=1)  # [A, g, g]: the mean over the shown layers
    save_png(path("strip.png"), strip(display, summary, pieces))
    np.savez(path("attention.npz"), rows=ex.rows, image_maps=ex.image_maps, shown=shown, strip=summary,
             tokens=ex.tokens, answer=ex.answer, pieces=np.array(pieces), query_positions=ex.query_positions,
             layers=np.array(layers), head=np.int64(-1 if head_index is None else head_index),
             prompt_len=np.int64(ex.prompt_len), num_image_tokens=np.int64(ex.num_image_tokens),
             grid=np.int64(grid), dtype=np.array(str(ex.rows.dtype)))

    base, notes = "image.png", []
    task = prompt.split(" ", 1)[0]
    if task in ("detect", "segment"):
        objects, masks = _objects(model, task, answer_text, display.shape[0])
        save_png(path("objects.png"), draw_objects(display, objects, masks))
        side = display.shape[0]
        np.savez(path("objects.npz"), boxes=np.array([o.box for o in objects], np.int64).reshape(-1, 4),
                 labels=np.array([o.label for o in objects]),
                 masks=np.array([np.zeros((side, side), np.float32) if m is None else m for m in masks],
                                np.float32).reshape(-1, side, side))
        base = "objects.png"
        notes.append(f"{len(objects)} object(s) parsed from the answer"
                     + ("" if task == "detect" or model.vae else "; no VAE, so no masks") + ".")
    layer_text = "every layer" if len(layers) > 1 else f"layer {layers[0]}"
    what = (f"Maps: {layer_text}, {head_name}, attention of the query that produced each token over the "
            f"{grid}x{grid} image tokens, scaled to each map's maximum (raw values: attention.npz).")
    notes.append("Token 0 was chosen by the query at the separator; token a by the query at token a - 1. "
                 f"Computed with the NumPy reference in {ex.rows.dtype}.")
    extras = [("mask.png", "the attention mask of the whole sequence"),
              ("strip.png", "every answer token" + (" (mean over the shown layers)" if len(layers) > 1 else ""))]
    write_page(path("index.html"), prompt, answer_text, pieces, maps, base, what, notes, extras)
    return files
