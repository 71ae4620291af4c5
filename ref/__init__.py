"""The NumPy reference implementation of PaliGemma and PaliGemma 2.

    from paligemma import ref
    config = ref.get_config("tiny-paligemma2")
    params = ref.init_params(config, seed=0, dtype=np.float64)
    logits = ref.forward(params, config, images, tokens, mask_ar, input_mask)
    out = ref.generate(params, config, images, tokens, mask_ar, input_mask, max_new_tokens=16)
"""

from .checkpoint import load, save
from .config import (PRESETS, GemmaConfig, PaliGemmaConfig, VisionConfig, count_params, describe,
                     get_config)
from .decode import Generation, KVCache, Sampler, extend, generate, parse_sampler, prefill
from .image import load_image, preprocess
from .mask import make_attn_mask
from .model import forward
from .params import cast_params, flatten, init_params, num_params, param_shapes, unflatten
from .tokenizer import Prompt, Tokenizer, TrainExample, train_tiny_tokenizer
from .video import load_video

__all__ = [
    "load", "save",
    "PRESETS", "GemmaConfig", "PaliGemmaConfig", "VisionConfig", "count_params", "describe", "get_config",
    "Generation", "KVCache", "Sampler", "extend", "generate", "parse_sampler", "prefill",
    "load_image", "preprocess", "make_attn_mask", "forward",
    "cast_params", "flatten", "init_params", "num_params", "param_shapes", "unflatten",
    "Prompt", "Tokenizer", "TrainExample", "train_tiny_tokenizer",
    "load_video",
]
