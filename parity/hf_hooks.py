"""The stage names on Hugging Face transformers' PaliGemma, recorded with forward hooks.

For ports that start from transformers (or to see where HF and a port part ways):

    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    acts = record_transformers(model, config, *golden_inputs)     # name -> np.ndarray
    compare.check("golden.npz", acts)

`HF_STAGES` is the mapping docs/porting.md prints: stage -> (tower, module path inside the
tower, what to take). Module paths differ between transformers versions only in the tower
prefixes (`TOWER_PREFIXES`), which are looked up on the model. torch is imported by the caller
(the model); nothing here imports it at module level.
"""

import numpy as np

from paligemma.ref.capture import stage_names

# The first prefix that names a module of the model wins (transformers 5.6+, 4.52-5.5, 4.41-4.51).
TOWER_PREFIXES = {
    "vision": ("model.vision_tower.", "model.vision_tower.vision_model.", "vision_tower.vision_model."),
    "projector": ("model.", ""),
    "llm": ("model.language_model.", "language_model.model."),
}

# stage pattern -> (tower, module inside it, what to take): "out" the module's output (its first
# element when a tuple), "weights" the attention weights (second element; eager attention only),
# "in" the module's input (a pre-hook).
HF_STAGES = {
    "img/embed": ("vision", "embeddings", "out"),
    "img/block_{i}/attn_probs": ("vision", "encoder.layers.{n}.self_attn", "weights"),
    "img/block_{i}/attn_out": ("vision", "encoder.layers.{n}.self_attn", "out"),
    "img/block_{i}/mlp_out": ("vision", "encoder.layers.{n}.mlp", "out"),
    "img/block_{i}/out": ("vision", "encoder.layers.{n}", "out"),
    "img/encoder_norm": ("vision", "post_layernorm", "out"),
    "img/head": ("projector", "multi_modal_projector", "out"),
    "llm/embed": ("llm", "layers.0", "in"),
    "llm/block_{i}/attn_probs": ("llm", "layers.{n}.self_attn", "weights"),
    "llm/block_{i}/attn_out": ("llm", "layers.{n}.self_attn", "out"),
    "llm/block_{i}/mlp_out": ("llm", "layers.{n}.mlp", "out"),
    "llm/block_{i}/out": ("llm", "layers.{n}", "out"),
    "llm/final_norm": ("llm", "norm", "out"),
}


def _pattern(stage):
    """`llm/block_03/mlp_out` -> ("llm/block_{i}/mlp_out", 3); other names -> (name, None)."""
    parts = stage.split("/")
    if len(parts) == 3 and parts[1].startswith("block_"):
        return f"{parts[0]}/block_{{i}}/{parts[2]}", int(parts[1][len("block_"):])
    return stage, None


def module_for(stage, modules):
    """(full module name, what to take) of a stage on a model whose `named_modules()` are `modules`."""
    pattern, layer = _pattern(stage)
    tower, path, take = HF_STAGES[pattern]
    path = path.format(n=layer)
    for prefix in TOWER_PREFIXES[tower]:
        if prefix + path in modules:
            return prefix + path, take
    raise ValueError(f"hf_hooks: no module for {stage!r}: tried {[p + path for p in TOWER_PREFIXES[tower]]}")


def record_transformers(model, config, images, tokens, mask_ar, input_mask=None, probs=False):
    """Every stage of a transformers PaliGemma on this project's inputs (no padding), as float64 NumPy.

    Args:
      model: `PaliGemmaForConditionalGeneration` (eager attention for `probs`).
      config: the matching `PaliGemmaConfig` (for the names and the vocabulary).
      images [B, R, R, 3], tokens, mask_ar, input_mask [B, T]: as `paligemma.ref.forward`.
    Returns:
      dict name -> np.ndarray, pipeline order; `logits` are the text rows, cut to the vocabulary.
    """
    import torch

    if input_mask is not None and not np.all(input_mask):
        raise ValueError("record_transformers: inputs with padding are not supported (HF pads on the left)")
    modules = dict(model.named_modules())
    values, handles = {}, []

    def keep(stage, take):
        def hook(module, args, kwargs, output=None):
            if take == "in":
                value = args[0] if args else kwargs["hidden_states"]
            else:
                value = output[1 if take == "weights" else 0] if isinstance(output, tuple) else output
            values[stage] = value.detach().to(torch.float64).numpy()
        return hook

    for stage in stage_names(config, probs=probs)[:-1]:  # logits come from the model's output
        name, take = module_for(stage, modules)
        hook = keep(stage, take)
        if take == "in":
            handles.append(modules[name].register_forward_pre_hook(hook, with_kwargs=True))
        else:
            handles.append(modules[name].register_forward_hook(hook, with_kwargs=True))
    B, T = np.shape(tokens)
    P, V = config.vision.num_patches, config.llm.vocab_size
    image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    ids = np.concatenate([np.full((B, P), image_id), np.asarray(tokens)], axis=1)  # [B, P+T]
    types = np.concatenate([np.zeros((B, P), int), np.asarray(mask_ar)], axis=1)  # 1: suffix (causal)
    try:
        with torch.no_grad():
            out = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                        attention_mask=torch.ones(ids.shape, dtype=torch.long),
                        pixel_values=torch.tensor(np.asarray(images, np.float32).transpose(0, 3, 1, 2)),
                        output_attentions=probs)
    finally:
        for h in handles:
            h.remove()
    values["logits"] = out.logits[:, P:, :V].to(torch.float64).numpy()  # [B, T, V]
    order = stage_names(config, probs=probs)
    return {name: values[name] for name in order if name in values}
