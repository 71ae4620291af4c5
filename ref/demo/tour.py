"""`python -m paligemma.ref.demo`: a randomly initialised PaliGemma 2, run end to end, stage by stage, with shapes.

The model has the real image geometry (224 px, 14 px patches -> 256 image tokens) and the
real 257,152-token vocabulary, but narrow towers so it runs in seconds on a laptop CPU.
Its weights are random, so its words are noise: the point is to watch the data flow.
(`make demo` runs the trained embedded demo model instead: `paligemma demo`, cli/demo.py,
with the files of assets/ beside this one.)
"""

import argparse
import time

import numpy as np

from .. import gemma, siglip
from ..config import GemmaConfig, PaliGemmaConfig, VisionConfig, describe
from ..decode import generate
from ..mask import make_attn_mask
from ..model import embed_image_and_text, forward, prefix_lm_masks
from ..params import init_params, layer_slice

DEMO = PaliGemmaConfig(
    VisionConfig(image_size=224, patch_size=14, width=96, depth=3, mlp_dim=192, num_heads=4),
    GemmaConfig(width=128, depth=4, mlp_dim=256, num_heads=4, num_kv_heads=2, head_dim=32,
                attn_logits_softcap=50.0, final_logits_softcap=30.0, post_norms=True),
    name="demo-paligemma2-random",
)


def synthetic_image(size):
    """A disc on a gradient, as a [1, R, R, 3] array in [-1, 1] (what preprocessing yields)."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(np.float64)
    rgb = np.stack([x, y, disc], axis=-1)  # [R, R, 3] in [0, 1]
    return (rgb * 2.0 - 1.0)[None]


def show(label, array, note=""):
    shape = "x".join(str(d) for d in np.shape(array))
    stats = f"mean {np.mean(array):+.3f}  std {np.std(array):.3f}" if np.size(array) > 1 else ""
    print(f"  {label:<34} [{shape:>16}]  {stats}  {note}".rstrip())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    config = DEMO
    v, g = config.vision, config.llm

    print(f"1. Model  {describe(config)}")
    t0 = time.perf_counter()
    params = init_params(config, seed=args.seed, dtype=np.float32, random_norms=True)
    print(f"   random float32 parameters built in {time.perf_counter() - t0:.2f}s\n")

    print("2. Inputs")
    images = synthetic_image(v.image_size)
    show("image (pixels / 127.5 - 1)", images)
    # "[BOS] caption en \n": real Gemma ids would come from the tokenizer; these stand in.
    tokens = np.array([[config.bos_id, 6111, 1961, 108]])
    mask_ar = np.zeros_like(tokens)  # all prefix: bidirectional with the image
    input_mask = np.ones_like(tokens, dtype=bool)
    print(f"  tokens {tokens[0].tolist()}  mask_ar {mask_ar[0].tolist()}  (BOS, prefix, '\\n')\n")

    print(f"3. Vision tower: SigLIP, {v.depth} pre-LN blocks, no pooling")
    x = siglip.patch_embed(params["img"]["embedding"], images.astype(np.float32), v.patch_size)
    show(f"patch_embed ({v.patch_size}x{v.patch_size} patches)", x, f"{v.grid}x{v.grid} grid, row-major")
    x = siglip.add_position_embedding(x, params["img"]["pos_embedding"])
    show("+ pos_embedding", x)
    blocks = params["img"]["Transformer"]["encoderblock"]
    for i in range(v.depth):
        x = siglip.encoder_block(layer_slice(blocks, i), x, v.layer_norm_eps)
        show(f"encoder block {i}", x)
    norm = params["img"]["Transformer"]["encoder_norm"]
    x = siglip.layer_norm(x, norm["scale"], norm["bias"], v.layer_norm_eps)
    show("encoder_norm", x)
    zimg = siglip.head(params["img"]["head"], x)
    show("head: projection to LLM width", zimg, "(image tokens are not scaled)")
    print()

    print("4. Text embedding and the joined sequence")
    ztxt = gemma.embed_tokens(params["llm"]["embedder"], tokens, np.float32)
    show(f"embed x sqrt({g.width})", ztxt)
    seq, full_mask, full_ar = embed_image_and_text(params, config, images, tokens, mask_ar, input_mask)
    show("[image ; text]", seq, f"{v.num_patches} image + {tokens.shape[1]} text tokens")
    attn = make_attn_mask(full_mask, full_ar)
    print(f"  prefix-LM mask {list(attn.shape)}: {attn.mean():.0%} visible "
          "(image + prefix attend to each other fully)\n")

    print(f"5. Language model: Gemma 2, {g.depth} blocks, GQA {g.num_heads}q/{g.num_kv_heads}kv, post-norms, "
          f"softcaps {g.attn_logits_softcap:g}/{g.final_logits_softcap:g}")
    attn_mask, local_mask, positions = prefix_lm_masks(config, full_mask, full_ar)
    h = seq
    for i in range(g.depth):
        h = gemma.block(layer_slice(params["llm"]["layers"], i), h, positions, attn_mask, g)
        show(f"block {i}", h)
    h = gemma.rms_norm(h, params["llm"]["final_norm"]["scale"], g.norm_eps)
    show("final_norm", h)
    logits = gemma.logits(params["llm"], h[:, v.num_patches:], g)
    show("logits (tied embedding, softcap)", logits, "text positions only")
    reference = forward(params, config, images, tokens, mask_ar, input_mask)
    print(f"  stage by stage vs forward(): max |diff| = {np.abs(logits - reference).max():.2e}\n")

    print(f"6. Greedy decoding with a KV cache (max {args.max_new_tokens} tokens)")
    t0 = time.perf_counter()
    out = generate(params, config, images, tokens, mask_ar, input_mask, max_new_tokens=args.max_new_tokens)
    elapsed = time.perf_counter() - t0
    print(f"  tokens   {out.tokens[0].tolist()}")
    print(f"  logprobs {np.round(out.logprobs[0], 2).tolist()}")
    print(f"  {elapsed:.2f}s for prefill + {args.max_new_tokens - 1} cached steps "
          "(random weights: the ids mean nothing yet)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
