"""The reference against Hugging Face transformers (an implementation nobody here wrote).

Tiny random PaliGemma / PaliGemma 2 models are built in transformers, given random non-zero
norm weights (zero norms would hide a missing `1 + scale`), saved with `save_pretrained`,
loaded with `paligemma.ref.load`, and run on the same inputs in float32.
"""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from paligemma import ref  # noqa: E402
from paligemma.ref.ops import log_softmax  # noqa: E402

VOCAB, IMAGE_ID = 320, 300  # the HF embedding is wider than the text vocabulary, as on the hub
REL_TOL = 1e-5  # float32 on both sides; measured ~5e-7


def hf_config(gemma2, sliding_window=4096, final_softcap=30.0):
    text = dict(model_type="gemma2" if gemma2 else "gemma", hidden_size=64, intermediate_size=128,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2 if gemma2 else 1,
                head_dim=16, vocab_size=VOCAB, hidden_activation="gelu_pytorch_tanh")
    if gemma2:
        text.update(query_pre_attn_scalar=16, attn_logit_softcapping=50.0, final_logit_softcapping=final_softcap,
                    sliding_window=sliding_window)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, patch_size=8, image_size=32, vision_use_head=False)
    return transformers.PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                                        vocab_size=VOCAB, projection_dim=64, hidden_size=64)


def build_hf(tmp_path, gemma2, attn="eager", seed=0, **kwargs):
    torch.manual_seed(seed)
    model = transformers.PaliGemmaForConditionalGeneration(hf_config(gemma2, **kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "vision" in name else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "hf")
    return transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        tmp_path / "hf", attn_implementation=attn).eval()


def make_batch(config, seed=0):
    """Two prompts of different lengths with a suffix: ours right-padded, HF's left-padded."""
    rng = np.random.default_rng(seed)
    P = config.vision.num_patches
    prompts = [(rng.integers(3, IMAGE_ID, 5), rng.integers(3, IMAGE_ID, 3)),
               (rng.integers(3, IMAGE_ID, 2), rng.integers(3, IMAGE_ID, 4))]
    texts = [np.concatenate([[2], pre, [108], suf]) for pre, suf in prompts]
    T = max(len(t) for t in texts)
    tokens = np.zeros((2, T), np.int64)
    mask_ar = np.ones((2, T), np.int64)
    input_mask = np.zeros((2, T), bool)
    ids, attn, types = [], [], []
    for b, ((pre, suf), text) in enumerate(zip(prompts, texts)):
        n_prefix = len(pre) + 2
        tokens[b, :len(text)], input_mask[b, :len(text)], mask_ar[b, :n_prefix] = text, True, 0
        pad = T - len(text)
        ids.append([0] * pad + [IMAGE_ID] * P + list(text))
        attn.append([0] * pad + [1] * (P + len(text)))
        types.append([0] * (pad + P + n_prefix) + [1] * len(suf))
    images = rng.uniform(-1, 1, (2, config.vision.image_size, config.vision.image_size, 3)).astype(np.float32)
    hf = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn), token_type_ids=torch.tensor(types),
              pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)))
    return (images, tokens, mask_ar, input_mask), hf


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("gemma2, attn", [(False, "eager"), (False, "sdpa"), (True, "eager")])
def test_logits_and_loss_match_transformers(tmp_path, gemma2, attn):
    model = build_hf(tmp_path, gemma2, attn)
    config, params = ref.load(tmp_path / "hf")
    ours_in, hf_in = make_batch(config)
    images, tokens, mask_ar, input_mask = ours_in
    T = tokens.shape[1]
    labels = torch.where(hf_in["token_type_ids"] == 1, hf_in["input_ids"], torch.tensor(-100))
    with torch.no_grad():
        out = model(**hf_in, labels=labels)
    hf_logits = out.logits[:, -T:].numpy()  # left padding: the text is at the end of each row
    logits = ref.forward(params, config, *ours_in)
    assert logits.dtype == np.float32
    for b in range(2):
        n = int(input_mask[b].sum())
        assert rel_err(logits[b, :n], hf_logits[b, T - n:]) < REL_TOL

    # HF's loss: mean next-token cross-entropy over every labelled (suffix) token of the batch.
    logp = log_softmax(logits.astype(np.float64))
    suffix = (mask_ar == 1) & input_mask
    nll = [-logp[b, t - 1, tokens[b, t]] for b in range(2) for t in range(T) if suffix[b, t]]
    assert abs(np.mean(nll) - out.loss.item()) < REL_TOL * abs(out.loss.item())


@pytest.mark.parametrize("gemma2", [False, True])
def test_ten_greedy_tokens_match_transformers(tmp_path, gemma2):
    model = build_hf(tmp_path, gemma2, seed=3)
    config, params = ref.load(tmp_path / "hf")
    rng = np.random.default_rng(5)
    P, R = config.vision.num_patches, config.vision.image_size
    text = np.concatenate([[2], rng.integers(3, IMAGE_ID, 4), [108]])
    images = rng.uniform(-1, 1, (1, R, R, 3)).astype(np.float32)
    ids = torch.tensor([[IMAGE_ID] * P + list(text)])
    with torch.no_grad():
        hf_out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids),
                                pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)), max_new_tokens=10,
                                do_sample=False, eos_token_id=1, pad_token_id=0)
    hf_tokens = hf_out[0, ids.shape[1]:].numpy()
    ours = ref.generate(params, config, images, text[None], np.zeros((1, len(text)), np.int64), None,
                        max_new_tokens=10)
    n = ours.lengths(config.eos_id)[0]
    assert n == len(hf_tokens) and list(ours.tokens[0, :n]) == list(hf_tokens)


def test_sliding_window_matches_transformers(tmp_path):
    # A window shorter than the sequence, so local layers really differ from global ones;
    # the config.json carries it, and the reference applies HF's (>= 5.9) semantics.
    model = build_hf(tmp_path, True, sliding_window=6, seed=1)
    config, params = ref.load(tmp_path / "hf")
    assert config.llm.sliding_window == 6
    ours_in, hf_in = make_batch(config, seed=2)
    images, tokens, mask_ar, input_mask = ours_in
    keep = slice(0, 1)  # the longest prompt: no left padding (HF counts left pads inside the window)
    with torch.no_grad():
        hf_logits = model(**{k: v[keep] for k, v in hf_in.items()}).logits[:, -tokens.shape[1]:].numpy()
    logits = ref.forward(params, config, images[keep], tokens[keep], mask_ar[keep], input_mask[keep])
    assert rel_err(logits, hf_logits) < REL_TOL
    windowless = ref.forward(params, config.replace(llm=dataclasses.replace(config.llm, sliding_window=None)),
                             images[keep], tokens[keep], mask_ar[keep], input_mask[keep])
    assert rel_err(windowless, hf_logits) > 1e-3  # the window mattered


def test_hf_loads_what_we_save(tmp_path):
    config = ref.get_config("tiny-paligemma2")
    params = ref.init_params(config, seed=2, dtype=np.float32, random_norms=True)
    ref.save(tmp_path / "ours", config, params, format="hf")
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    rng = np.random.default_rng(0)
    P, text = config.vision.num_patches, np.array([2, 17, 42, 108, 55, 66])
    images = rng.uniform(-1, 1, (1, 28, 28, 3)).astype(np.float32)
    ids = torch.tensor([[config.llm.vocab_size] * P + list(text)])  # <image> id = first id past the vocabulary
    types = torch.tensor([[0] * (P + 4) + [1, 1]])
    with torch.no_grad():
        hf_logits = model(input_ids=ids, pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
                          token_type_ids=types, attention_mask=torch.ones_like(ids)).logits[0, P:].numpy()
    logits = ref.forward(params, config, images, text[None], np.array([[0, 0, 0, 0, 1, 1]]))[0]
    assert rel_err(logits, hf_logits) < REL_TOL
