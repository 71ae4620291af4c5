"""Port validation tools: named activations (ref and fast), golden files, `check`, `parity self`, the CLI.

The perturbation tests draw which stage to corrupt (hypothesis); the semantics of the names are
checked against independent formulas (residual sums, softmax rows, the tied projection); fast's
activations are compared with ref's golden; the planted bugs of docs/porting.md must each be
named at their stage. About a minute on one core, most of it compiling fast's tiny models.
"""

import io
import json
import types
import zipfile

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from paligemma import ref
from paligemma.parity import compare, golden, planted_bugs
from paligemma.parity.self_check import TINY, self_check
from paligemma.parity.tolerances import STAGE_FLOAT32, relative_error
from paligemma.ref import capture

cli = pytest.importorskip("paligemma.cli.main")

CONFIG = "tiny-paligemma2"


@pytest.fixture(scope="module")
def model():
    config = ref.get_config(CONFIG)
    params = ref.init_params(config, seed=3, dtype=np.float64, random_norms=True)
    inputs = golden.random_inputs(config, seed=3)
    gold = golden.make_golden(params, config, *inputs, probs=True)
    return types.SimpleNamespace(config=config, params=params, inputs=inputs, gold=gold)


@pytest.fixture(scope="module")
def golden_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("golden") / "golden.npz"
    golden.write(path, model.gold)
    return str(path)


def _copy(acts, **changes):
    arrays = {k: np.array(v) for k, v in acts.arrays.items()}
    arrays.update(changes)
    return golden.Activations(arrays, acts.manifest, "copy")


# --- named activations ----------------------------------------------------------------------


def test_stage_names_in_pipeline_order():
    config = ref.get_config("tiny-paligemma")  # vision depth 2, language model depth 2
    block = lambda t, i: [f"{t}/block_0{i}/attn_out", f"{t}/block_0{i}/mlp_out", f"{t}/block_0{i}/out"]  # noqa: E731
    expected = (["img/embed"] + block("img", 0) + block("img", 1) + ["img/encoder_norm", "img/head", "llm/embed"]
                + block("llm", 0) + block("llm", 1) + ["llm/final_norm", "logits"])
    assert list(capture.stage_names(config)) == expected
    with_probs = capture.stage_names(config, probs=True)
    assert with_probs[1:5] == ("img/block_00/attn_probs", "img/block_00/attn_out", "img/block_00/mlp_out",
                               "img/block_00/out")


@pytest.mark.parametrize("name", TINY)
def test_ref_capture_does_not_change_forward(name):
    config = ref.get_config(name)
    params = ref.init_params(config, seed=1, dtype=np.float64, random_norms=True)
    inputs = golden.random_inputs(config, seed=1)
    plain = ref.forward(params, config, *inputs)
    with capture.recording(probs=True) as rec:
        recorded = ref.forward(params, config, *inputs)
    assert np.array_equal(plain, recorded)
    assert list(rec.values) == list(capture.stage_names(config, probs=True))
    assert np.array_equal(rec.values["logits"], plain)
    assert capture.record("x", 5) == 5 and not capture.active()  # off again, and a no-op when off
    with capture.recording(names=["llm/final_norm", "img/block_01/attn_probs"]) as some:
        ref.forward(params, config, *inputs)
    assert list(some.values) == ["img/block_01/attn_probs", "llm/final_norm"]


def test_recorded_stages_mean_what_their_names_say():
    """Gemma 1 and SigLIP blocks are x + attn_out + mlp_out; probabilities are softmax rows over
    visible keys; logits are the text rows of final_norm times the tied embedding."""
    config = ref.get_config("tiny-paligemma")
    params = ref.init_params(config, seed=2, dtype=np.float64, random_norms=True)
    images, tokens, mask_ar, input_mask = golden.random_inputs(config, seed=2)
    s = golden.record_stages(params, config, images, tokens, mask_ar, input_mask, probs=True)
    for tower, first, depth in (("img", "img/embed", config.vision.depth), ("llm", "llm/embed", config.llm.depth)):
        x = s[first]
        for i in range(depth):
            b = f"{tower}/block_{i:02d}"
            np.testing.assert_allclose(s[f"{b}/out"], x + s[f"{b}/attn_out"] + s[f"{b}/mlp_out"], atol=1e-12)
            np.testing.assert_allclose(s[f"{b}/attn_probs"].sum(-1), 1.0, atol=1e-12)
            x = s[f"{b}/out"]
    P, D = config.vision.num_patches, config.llm.width
    table = params["llm"]["embedder"]["input_embedding"]
    np.testing.assert_allclose(s["llm/embed"][:, :P], s["img/head"], atol=0)
    np.testing.assert_allclose(s["llm/embed"][:, P:], table[tokens] * np.sqrt(D), rtol=1e-14)
    probs = s["llm/block_00/attn_probs"]  # [B, N, P+T, P+T]
    mask = ref.make_attn_mask(np.concatenate([np.ones((2, P), bool), input_mask], 1),
                              np.concatenate([np.zeros((2, P), int), mask_ar], 1))
    assert np.all(probs[~np.broadcast_to(mask[:, None], probs.shape)] < 1e-30)  # nothing leaks past the mask
    np.testing.assert_allclose(s["logits"], s["llm/final_norm"][:, P:] @ table.T, rtol=1e-12, atol=1e-12)


# --- golden files -----------------------------------------------------------------------------


def test_golden_files_are_byte_identical_and_read_back(model, golden_file, tmp_path):
    again = golden.make_golden(model.params, model.config, *model.inputs, probs=True)
    golden.write(tmp_path / "again.npz", again)
    assert (tmp_path / "again.npz").read_bytes() == open(golden_file, "rb").read()
    back = golden.read(golden_file)
    assert list(back.arrays) == list(golden.INPUTS) + list(capture.stage_names(model.config, probs=True))
    for k, v in model.gold.arrays.items():
        assert back.arrays[k].dtype == v.dtype and np.array_equal(back.arrays[k], v)
    m = back.manifest
    assert m["format"] == golden.FORMAT and m["config"]["name"] == CONFIG and m["config"]["llm"]["num_kv_heads"] == 2
    assert m["shapes"]["logits"] == [2, 8, model.config.llm.vocab_size] and m["dtypes"]["img/embed"] == "float64"
    assert set(m["sensitivity"]) == set(m["names"]) and {"numpy", "paligemma"} <= set(m["versions"])
    assert m["tolerances"]["float32"]["name"] == "STAGE_FLOAT32"
    with pytest.raises(ValueError, match="already exists"):
        golden.write(golden_file, back)


def test_sensitivity_is_a_small_relative_move(model):
    sens = model.gold.manifest["sensitivity"]
    assert 1e-4 < sens["img/embed"] < 1e-2  # one patch kernel times 1 + 2^-8 U(-1, 1)
    assert all(0 <= v < 1 for v in sens.values())


def test_unreadable_files_raise_golden_error(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(golden.GoldenError, match="junk.npz"):
        golden.read(tmp_path / "junk.npz")
    with pytest.raises(golden.GoldenError, match="no such file"):
        golden.read(tmp_path / "absent.npz")
    bad = golden.Activations({"logits": np.zeros(3)}, None)
    golden.write(tmp_path / "bad.npz", bad)
    with zipfile.ZipFile(tmp_path / "bad.npz", "a") as zf:
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.frombuffer(b"{not json", np.uint8))
        zf.writestr("manifest.npy", buf.getvalue())
    with pytest.raises(golden.GoldenError, match="manifest"):
        golden.read(tmp_path / "bad.npz")


# --- check ------------------------------------------------------------------------------------


def test_an_unperturbed_float32_copy_passes(model):
    theirs = {k: v.astype(np.float32) for k, v in model.gold.arrays.items()}
    report = compare.check(model.gold, theirs)
    assert report.ok and report.first_failure is None and not report.missing and not report.extra
    assert [r.name for r in report.rows] == list(capture.stage_names(model.config, probs=True))
    assert "PASS" in report.format_table()


@settings(max_examples=25)
@given(data=st.data())
def test_one_perturbed_stage_is_named_first(model, data):
    names = model.gold.manifest["names"]
    target = data.draw(st.sampled_from(names), label="stage")
    size = data.draw(st.floats(1e-3, 1.0), label="relative size")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    rng = np.random.default_rng(seed)
    value = model.gold.arrays[target]
    flat = value.reshape(-1).copy()
    flat[rng.integers(flat.size)] += size * np.abs(value).max() * rng.choice([-1.0, 1.0])  # one element
    report = compare.check(model.gold, _copy(model.gold, **{target: flat.reshape(value.shape)}))
    assert not report.ok
    assert report.first_failure.name == target
    assert [r.name for r in report.rows if r.status != compare.OK] == [target]
    assert f"first broken stage {target}" in report.format_table()


def test_missing_extra_shape_nonfinite_config_and_inputs_are_reported(model):
    g = model.gold
    arrays = {k: v for k, v in g.arrays.items() if k not in ("img/embed", "llm/block_01/mlp_out")}
    arrays["llm/block_01/my_extra"] = np.zeros(3)
    arrays["logits"] = np.swapaxes(g.arrays["logits"], 1, 2)
    bad = g.arrays["llm/final_norm"].copy()
    bad[0, 1, 2] = np.nan
    arrays["llm/final_norm"] = bad
    arrays["inputs/tokens"] = g.arrays["inputs/tokens"] + 1
    other = dict(g.manifest, config={**g.manifest["config"], "llm": {**g.manifest["config"]["llm"], "num_kv_heads": 1}})
    report = compare.check(g, golden.Activations(arrays, other, "theirs.npz"))
    assert not report.ok
    assert report.missing == ("img/embed", "llm/block_01/mlp_out") and report.extra == ("llm/block_01/my_extra",)
    status = {r.name: r for r in report.rows}
    assert status["img/embed"].status == compare.MISSING
    assert status["llm/final_norm"].status == compare.NONFINITE and "[0, 1, 2]" in status["llm/final_norm"].note
    assert status["logits"].status == compare.SHAPE and "transpose" in status["logits"].note
    assert report.first_failure.name == "llm/final_norm"
    assert any("llm.num_kv_heads: golden 2, theirs 1" in p for p in report.problems)
    assert any(p.startswith("inputs/tokens") for p in report.problems)
    table = report.format_table()
    for text in ("missing in theirs, skipped (2)", "my_extra", "NON-FINITE", "SHAPE", "problem: a different config"):
        assert text in table
    assert json.loads(json.dumps(report.to_json()))["first_failure"] == "llm/final_norm"


def test_nothing_in_common_fails_without_rows(model):
    report = compare.check(model.gold, {"something_else": np.zeros(2)})
    assert not report.ok and report.first_failure is None and report.compared == 0
    assert "no stage in common" in report.format_table()


def test_fast_activations_pass_against_the_golden_in_float32_and_bfloat16(model):
    from paligemma.fast import capture as fast_capture
    from paligemma.fast.policy import Policy

    for dtype, pdtype, policy in (("float32", np.float32, Policy(attention_impl="xla")),
                                  ("bfloat16", ml_dtypes.bfloat16, Policy("bfloat16", "bfloat16", "xla"))):
        acts = fast_capture.forward(ref.cast_params(model.params, pdtype), model.config, *model.inputs,
                                    policy=policy, probs=True)
        assert list(acts) == list(capture.stage_names(model.config, probs=True))
        report = compare.check(model.gold, acts, dtype=dtype)
        assert report.ok, report.format_table()
    # and the ordinary compiled forward (no recorder) gives logits within the same bound
    from paligemma import fast
    logits = fast.forward(ref.cast_params(model.params, np.float32), model.config, *model.inputs,
                          policy=Policy(attention_impl="xla"))
    assert relative_error(logits, model.gold.arrays["logits"]) <= STAGE_FLOAT32.rel


@pytest.mark.parametrize("name", TINY)
def test_parity_self_passes_on_every_tiny_preset(name):
    reports = self_check(name)
    labels = [label for label, _ in reports]
    assert labels == ["fast float32, attention xla", "fast float32, attention pallas_interpret"]
    for label, report in reports:
        assert report.ok, f"{label}\n{report.format_table()}"
    assert reports[0][1].missing == ()  # XLA reports the attention probabilities too


@pytest.mark.parametrize("bug", [None, *planted_bugs.BUGS])
def test_planted_bugs_are_found_at_their_stage(bug):
    report = planted_bugs.run(bug)
    if bug is None:
        assert report.ok, report.format_table()
    else:
        assert report.first_failure.name == planted_bugs.BUGS[bug][3], report.format_table()


# --- the command line -------------------------------------------------------------------------


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_golden_check_and_exit_codes(model, golden_file, tmp_path, capsys):
    out_path = tmp_path / "g.npz"
    code, out, _ = _run(capsys, "parity", "golden", "--random", "--config", CONFIG, "--seed", "3", "--probs",
                        "--out", str(out_path))
    assert code == 0 and "wrote" in out
    with zipfile.ZipFile(out_path) as a, zipfile.ZipFile(golden_file) as b:  # same seed: the same arrays, bytes
        members = [n for n in b.namelist() if n != "manifest.npy"]
        assert [n for n in a.namelist() if n != "manifest.npy"] == members
        assert all(a.read(n) == b.read(n) for n in members)
    code, out, _ = _run(capsys, "parity", "check", golden_file, str(out_path))
    assert code == 0 and "PASS" in out
    broken = _copy(model.gold, **{"llm/block_01/attn_out": model.gold.arrays["llm/block_01/attn_out"] * 1.01})
    golden.write(tmp_path / "broken.npz", broken)
    code, out, _ = _run(capsys, "parity", "check", golden_file, str(tmp_path / "broken.npz"), "--json")
    report = json.loads(out)
    assert code == 1 and report["first_failure"] == "llm/block_01/attn_out" and not report["ok"]
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in model.gold.arrays.items() if not k.startswith("inputs/")}
    np.savez(tmp_path / "bf16.npz", **bf16)  # NumPy stores bfloat16 as |V2: read back as bfloat16
    code, out, _ = _run(capsys, "parity", "check", golden_file, str(tmp_path / "bf16.npz"), "--dtype", "bfloat16")
    assert code == 0, out
    code, out, _ = _run(capsys, "parity", "check", golden_file, str(tmp_path / "bf16.npz"))  # float32 bounds: fails
    assert code == 1 and "first broken stage img/embed" in out


@pytest.mark.parametrize("argv, match", [
    (["parity", "check", "missing.npz", "missing.npz"], "missing.npz: no such file"),
    (["parity", "golden", "--out", "x.npz"], "missing --checkpoint, --tokenizer, --image, --prompt"),
    (["parity", "golden", "--random", "--out", "x.npz"], "exactly one of --config"),
    (["parity", "golden", "--random", "--config", "nope", "--out", "x.npz"], "unknown preset"),
    (["parity", "golden", "--random", "--config", CONFIG, "--prompt", "hi", "--out", "x.npz"], "drop --prompt"),
    (["parity", "self", "--config", "nope"], "unknown preset"),
    (["parity", "check", "a.npz"], "required"),
    (["parity"], "required"),
])
def test_cli_usage_errors_exit_2(argv, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, *argv)
    assert code == 2 and match in err


def test_cli_golden_from_a_checkpoint_uses_the_projects_io(tmp_path, capsys):
    tok = ref.train_tiny_tokenizer(tmp_path / "tok.model")
    config = ref.get_config(CONFIG, vocab_size=tok.vocab_size)
    params = ref.init_params(config, seed=0, random_norms=True)  # float32 weights
    ref.save(tmp_path / "model.npz", config, params)
    pixels = np.zeros((30, 44, 3), np.uint8)
    pixels[::3, :, 1] = 200
    Image.fromarray(pixels).save(tmp_path / "im.png")
    code, out, err = _run(capsys, "parity", "golden", "--checkpoint", str(tmp_path / "model.npz"), "--tokenizer",
                          str(tmp_path / "tok.model"), "--image", str(tmp_path / "im.png"), "--prompt", "caption en",
                          "--out", str(tmp_path / "g.npz"))
    assert code == 0, err
    g = golden.read(tmp_path / "g.npz")
    prompt = tok.prompt("caption en")
    assert np.array_equal(g.arrays["inputs/tokens"][0], prompt.tokens)
    assert np.array_equal(g.arrays["inputs/images"][0], ref.preprocess(str(tmp_path / "im.png"), 28))
    expected = ref.forward(ref.cast_params(params, np.float64), config, g.arrays["inputs/images"],
                           prompt.tokens[None], prompt.mask_ar[None], prompt.input_mask[None])
    assert np.array_equal(g.arrays["logits"], expected)  # float32 weights, run in float64
    assert g.manifest["source"]["prompt"] == "caption en" and g.manifest["source"]["kind"] == "checkpoint"


def test_cli_self_json(capsys):
    code, out, _ = _run(capsys, "parity", "self", "--config", "tiny-paligemma", "--json")
    result = json.loads(out)
    assert code == 0 and result["ok"] and len(result["reports"]) == 2


# --- transformers, through the documented module map ------------------------------------------


@pytest.mark.parametrize("name", TINY)
def test_transformers_hooks_give_every_stage_within_float32(name, tmp_path):
    """docs/porting.md's HF module table, executed: HF on our weights passes `check` at every stage."""
    transformers = pytest.importorskip("transformers")
    from paligemma.parity import hf_hooks

    config = ref.get_config(name)
    params = ref.init_params(config, seed=2, dtype=np.float32, random_norms=True)
    ref.save(tmp_path / "hf", config, params, format="hf")
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        tmp_path / "hf", attn_implementation="eager").eval()
    inputs = golden.random_inputs(config, seed=2)
    report = compare.check(golden.make_golden(params, config, *inputs, probs=True),
                           hf_hooks.record_transformers(model, config, *inputs, probs=True))
    assert report.ok and not report.missing and not report.extra, report.format_table()
