"""Configurations of PaliGemma and PaliGemma 2, and their parameter counts.

Frozen dataclasses, one per tower plus one for the whole model. The presets reproduce every
released architecture (big_vision `vit.decode_variant("So400m/14")` and `gemma.get_config`);
the tiny presets keep every structural feature at a size the tests can afford.
"""

import dataclasses

QUERY_SCALINGS = ("rsqrt_head_dim", "rsqrt_emb_per_head")


def _check(condition, message):
    if not condition:
        raise ValueError(message)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP ViT: pre-LN blocks, learned position embedding, no class token, no pooling."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        _check(self.image_size % self.patch_size == 0,
               f"VisionConfig: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        _check(self.width % self.num_heads == 0,
               f"VisionConfig: width {self.width} is not a multiple of num_heads {self.num_heads}")
        _check(min(self.depth, self.mlp_dim, self.num_heads, self.patch_size) >= 1,
               "VisionConfig: depth, mlp_dim, num_heads and patch_size must be >= 1")

    @property
    def grid(self):
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        """Image tokens P = (R / patch)^2: 256, 1024, 4096 at 224, 448, 896 px."""
        return self.grid**2

    @property
    def head_dim(self):
        return self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """Gemma (PaliGemma) or Gemma 2 (PaliGemma 2) decoder.

    `query_scaling`: "rsqrt_head_dim" scales queries by head_dim^-1/2; "rsqrt_emb_per_head"
    (Gemma 2 27B) by (width / num_heads)^-1/2. Softcaps of `None` are off. `sliding_window`
    (HF's Gemma 2 semantics, on even layers) is off by default, as in big_vision.
    """

    width: int = 2048
    depth: int = 18
    mlp_dim: int = 16384
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int = 257_152
    query_scaling: str = "rsqrt_head_dim"
    attn_logits_softcap: float | None = None
    final_logits_softcap: float | None = None
    post_norms: bool = False
    sliding_window: int | None = None
    rope_base: float = 10_000.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        _check(self.num_heads % self.num_kv_heads == 0,
               f"GemmaConfig: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        _check(self.head_dim % 2 == 0, f"GemmaConfig: head_dim must be even for RoPE, got {self.head_dim}")
        _check(self.query_scaling in QUERY_SCALINGS,
               f"GemmaConfig: query_scaling must be one of {QUERY_SCALINGS}, got {self.query_scaling!r}")
        _check(self.sliding_window is None or self.sliding_window >= 1,
               f"GemmaConfig: sliding_window must be None or >= 1, got {self.sliding_window}")
        for name in ("attn_logits_softcap", "final_logits_softcap"):
            cap = getattr(self, name)
            _check(cap is None or cap > 0, f"GemmaConfig: {name} must be None or > 0, got {cap}")

    @property
    def query_scale(self):
        if self.query_scaling == "rsqrt_head_dim":
            return self.head_dim**-0.5
        return (self.width // self.num_heads) ** -0.5

    @property
    def group_size(self):
        """G: query heads per kv head (query head n reads kv head n // G)."""
        return self.num_heads // self.num_kv_heads


def uses_sliding_window(config: GemmaConfig, layer):
    """True if `layer` attends through the sliding window (HF's Gemma 2 semantics).

    Gemma 2 alternates local and global attention, local first: with a window, layers 0, 2, 4,
    ... are local and 1, 3, 5, ... global (HF's `layer_types`); without one, every layer is
    global. `layer` may be a traced integer (`lax.scan`'s layer index); the answer then is too.

        uses_sliding_window(GemmaConfig(sliding_window=4096), 2)   # True
        uses_sliding_window(GemmaConfig(sliding_window=4096), 3)   # False
        uses_sliding_window(GemmaConfig(), 2)                      # False: no window
    """
    return config.sliding_window is not None and layer % 2 == 0


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
    """The whole model: vision tower, projection (`img/head`) and language model.

    The special ids are Gemma's: pad 0, eos 1, bos 2.

    `legacy_image_scaling` reproduces transformers 4.41-5.3, which divided image features by
    sqrt(D) and then multiplied the whole sequence by sqrt(D) cast to the parameter dtype: the
    same as big_vision (and transformers >= 5.4) in float32, ~7e-4 relative apart in bfloat16.
    """

    vision: VisionConfig = VisionConfig()
    llm: GemmaConfig = GemmaConfig()
    # A label only: not part of equality or hashing, so the same model loaded from two files
    # compiles once in `paligemma.fast`.
    name: str = dataclasses.field(default="custom", compare=False)
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2
    legacy_image_scaling: bool = False

    def __post_init__(self):
        for name in ("pad_id", "eos_id", "bos_id"):
            tid = getattr(self, name)
            _check(0 <= tid < self.llm.vocab_size,
                   f"PaliGemmaConfig: {name} {tid} is outside the vocabulary [0, {self.llm.vocab_size})")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


# --- Released architectures ---------------------------------------------------------------

SO400M = dict(patch_size=14, width=1152, depth=27, mlp_dim=4304, num_heads=16)

GEMMA_2B = GemmaConfig(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256)
_GEMMA2 = dict(attn_logits_softcap=50.0, final_logits_softcap=30.0, post_norms=True)
GEMMA2_2B = GemmaConfig(width=2304, depth=26, mlp_dim=9216, num_heads=8, num_kv_heads=4, head_dim=256, **_GEMMA2)
GEMMA2_9B = GemmaConfig(width=3584, depth=42, mlp_dim=14336, num_heads=16, num_kv_heads=8, head_dim=256, **_GEMMA2)
GEMMA2_27B = GemmaConfig(width=4608, depth=46, mlp_dim=36864, num_heads=32, num_kv_heads=16, head_dim=128,
                         query_scaling="rsqrt_emb_per_head", **_GEMMA2)

_LLMS = {
    "paligemma-3b": GEMMA_2B,
    "paligemma2-3b": GEMMA2_2B,
    "paligemma2-10b": GEMMA2_9B,
    "paligemma2-28b": GEMMA2_27B,
}

# Tiny models: every structural feature of the real ones (MQA/GQA, post-norms, softcaps, both
# query scalings, a patch grid), small enough for float64 tests in milliseconds.
_TINY_VISION = VisionConfig(image_size=28, patch_size=7, width=32, depth=2, mlp_dim=64, num_heads=4)
_TINY_LLMS = {
    "tiny-paligemma": GemmaConfig(width=48, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=1, head_dim=16,
                                  vocab_size=300),
    "tiny-paligemma2": GemmaConfig(width=48, depth=3, mlp_dim=96, num_heads=4, num_kv_heads=2, head_dim=16,
                                   vocab_size=300, **_GEMMA2),
    "tiny-paligemma2-28b": GemmaConfig(width=48, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=2, head_dim=8,
                                       vocab_size=300, query_scaling="rsqrt_emb_per_head", **_GEMMA2),
}


def _build_presets():
    presets = {}
    for family, llm in _LLMS.items():
        for res in (224, 448, 896):
            name = f"{family}-{res}"
            presets[name] = PaliGemmaConfig(VisionConfig(image_size=res, **SO400M), llm, name=name)
    for name, llm in _TINY_LLMS.items():
        presets[name] = PaliGemmaConfig(_TINY_VISION, llm, name=name)
    return presets


PRESETS = _build_presets()


def get_config(name, **llm_overrides):
    """A preset by name (see `PRESETS`), optionally with language-model fields replaced,
    e.g. `get_config("paligemma2-3b-224", final_logits_softcap=None)`."""
    if name not in PRESETS:
        raise ValueError(f"config: unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    config = PRESETS[name]
    if llm_overrides:
        config = config.replace(llm=dataclasses.replace(config.llm, **llm_overrides))
    return config


# --- Parameter counts ---------------------------------------------------------------------


def count_vision_params(v: VisionConfig, out_width: int) -> int:
    """Closed form for the vision tower and its projection head (`img/...`)."""
    patch = v.patch_size**2 * 3 * v.width + v.width
    posemb = v.num_patches * v.width
    attn = 4 * (v.width * v.width + v.width)  # q, k, v, out, each with a bias
    mlp = 2 * v.width * v.mlp_dim + v.mlp_dim + v.width
    norms = 2 * 2 * v.width
    encoder_norm = 2 * v.width
    head = v.width * out_width + out_width
    return patch + posemb + v.depth * (attn + mlp + norms) + encoder_norm + head


def count_llm_params(g: GemmaConfig) -> int:
    """Closed form for the language model (`llm/...`); the output projection is tied."""
    embed = g.vocab_size * g.width
    attn = (2 * g.num_heads + 2 * g.num_kv_heads) * g.width * g.head_dim  # q, o, k, v
    mlp = 3 * g.width * g.mlp_dim
    norms = (4 if g.post_norms else 2) * g.width
    return embed + g.depth * (attn + mlp + norms) + g.width


def count_params(config: PaliGemmaConfig) -> int:
    """Total parameters. PaliGemma 3B-224: 2,923,335,408; PaliGemma 2 3B-224: about 3.03B."""
    return count_vision_params(config.vision, config.llm.width) + count_llm_params(config.llm)


def describe(config: PaliGemmaConfig) -> str:
    """One line a person can read: sizes, tokens, attention layout."""
    v, g = config.vision, config.llm
    kind = "MQA" if g.num_kv_heads == 1 else ("MHA" if g.num_kv_heads == g.num_heads else "GQA")
    return (f"{config.name}: {count_params(config) / 1e9:.3f}B params; image {v.image_size}px -> "
            f"{v.num_patches} tokens x {v.width} (ViT {v.depth} blocks); Gemma{' 2' if g.post_norms else ''} "
            f"{g.depth} layers x {g.width}, {g.num_heads} heads / {g.num_kv_heads} kv ({kind}), "
            f"head_dim {g.head_dim}, query scale 1/{1 / g.query_scale:.4g}, vocab {g.vocab_size}")
