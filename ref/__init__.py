"""The NumPy reference implementation of PaliGemma and PaliGemma 2.

    from paligemma import ref
    config = ref.get_config("tiny-paligemma2")
    params = ref.init_params(config, seed=0, dtype=np.float64)
    logits = ref.forward(params, config, images, tokens, mask_ar, input_mask)
    out = ref.generate(params, config, images, tokens, mask_ar, input_mask, max_new_tokens=16)

The modules of this folder are the model, in the order of the data (config params ops mask
siglip gemma model decode capture, with vqvae and quant). What surrounds it lives in
subpackages named for what they are: `checkpoints` (files), `inputs` (tokenizer, images,
video), `tasks` (answers, scoring, metrics, drawing, synthetic scenes) and `demo` (the tour
and the embedded demo model). docs/architecture.md, "A map of the house", says why.
"""

from .checkpoints.checkpoint import load, save
from .config import (PRESETS, GemmaConfig, PaliGemmaConfig, VisionConfig, count_params, describe,
                     get_config)
from .decode import Generation, KVCache, Sampler, extend, generate, parse_sampler, prefill
from .inputs.image import load_image, preprocess
from .inputs.tokenizer import Prompt, Tokenizer, TrainExample, train_tiny_tokenizer
from .inputs.video import load_video
from .mask import make_attn_mask
from .model import forward
from .params import cast_params, flatten, init_params, num_params, param_shapes, unflatten

# The modules' names from before they moved into the subpackages (`from paligemma.ref import
# metrics` keeps working; the canonical spelling is `from paligemma.ref.tasks import metrics`).
# `tasks` is the subpackage itself, which re-exports what `ref/tasks.py` held.
from .checkpoints import checkpoint, hf_layout, inferconfig, quantfile, quantread, tensorfiles  # noqa: F401
from .inputs import image, media, tokenizer, video  # noqa: F401
from .tasks import draw, metrics, scoring, shapes  # noqa: F401

__all__ = [
    "load", "save",
    "PRESETS", "GemmaConfig", "PaliGemmaConfig", "VisionConfig", "count_params", "describe", "get_config",
    "Generation", "KVCache", "Sampler", "extend", "generate", "parse_sampler", "prefill",
    "load_image", "preprocess", "make_attn_mask", "forward",
    "cast_params", "flatten", "init_params", "num_params", "param_shapes", "unflatten",
    "Prompt", "Tokenizer", "TrainExample", "train_tiny_tokenizer",
    "load_video",
]
