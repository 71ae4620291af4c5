"""Inference on a device mesh (paligemma.fast.sharding, `mesh=` of forward / generate / PaliGemma / CLI).

The 8-device checks run in a subprocess with 8 virtual CPU devices (XLA_FLAGS must be set before
jax is imported): meshes 1x8, 2x4, 8x1 and 2x2x2 give the one-device logits (FLOAT32_REORDERED:
the same float32 arithmetic, summed in another order across devices) and the same greedy tokens,
for the tiny PaliGemma (kv heads K = 1) and PaliGemma 2 presets (K = 2 < model size 4 and 8: the
replicated-kv case); the arrays carry the table's shardings; loading onto a mesh reads one
device's shard at a time and never a whole tensor; the Pallas kernels under `shard_map`
(interpret mode) and the CLI's --mesh agree too. A TPU v5e 2x4 compile-only smoke test of
bench/compile_sharded.py runs in `.venv-tpu` (skipped, saying why, when it is missing).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from paligemma.fast import sharding
from paligemma.parity.tolerances import FLOAT32_REORDERED

ROOT = Path(__file__).resolve().parents[1]
TPU_PYTHON = ROOT / ".venv-tpu" / "bin" / "python"
P = sharding.PartitionSpec
PRESETS = ("tiny-paligemma", "tiny-paligemma2")
MESHES = ("data=1,model=8", "data=2,model=4", "data=8,model=1")
EXTRA = ("tiny-paligemma2", "data=2,fsdp=2,model=2")  # fsdp too, for one preset

# --- The rule table, by hand (one device) ---------------------------------------------------


def test_model_rules_by_hand():
    spec = sharding.param_spec
    # Heads and MLP hidden units over "model"; stacked and per-layer arrays alike.
    assert spec("llm/layers/attn/q_einsum/w", (2, 4, 48, 16), 1, 4) == P(None, "model", None, None)
    assert spec("llm/layers/attn/q_einsum/w", (4, 48, 16), 1, 4) == P("model", None, None)
    assert spec("llm/layers/attn/attn_vec_einsum/w", (2, 4, 16, 48), 1, 2) == P(None, "model", None, None)
    assert spec("llm/layers/mlp/gating_einsum", (2, 2, 48, 96), 1, 8) == P(None, None, None, "model")
    assert spec("llm/layers/mlp/linear", (2, 96, 48), 1, 8) == P(None, "model", None)
    # kv heads only when the model size divides K; K = 1 stays replicated.
    assert spec("llm/layers/attn/kv_einsum/w", (2, 2, 2, 48, 16), 1, 2) == P(None, None, "model", None, None)
    assert spec("llm/layers/attn/kv_einsum/w", (2, 2, 1, 48, 16), 1, 4) == P()
    assert spec("llm/layers/attn/q_einsum/w", (2, 4, 48, 16), 1, 8) == P()  # 8 does not divide 4 heads
    # The embedding by vocabulary rows, by width where the vocabulary does not divide.
    assert spec("llm/embedder/input_embedding", (257152, 2048), 1, 8) == P("model", None)
    assert spec("llm/embedder/input_embedding", (300, 48), 1, 8) == P(None, "model")
    # SigLIP: heads and MLP units; norms replicated.
    enc = "img/Transformer/encoderblock/"
    assert spec(enc + "MultiHeadDotProductAttention_0/key/kernel", (27, 1152, 16, 72), 1, 8) == P(
        None, None, "model", None)
    assert spec(enc + "MlpBlock_0/Dense_1/kernel", (27, 4304, 1152), 1, 8) == P(None, "model", None)
    assert spec(enc + "LayerNorm_0/scale", (27, 1152), 1, 8) == P()
    # fsdp takes the largest remaining axis; model wins its own axis.
    assert spec("llm/layers/mlp/linear", (2, 96, 48), 2, 2) == P(None, "model", "fsdp")
    assert spec("llm/layers/mlp/linear", (2, 96, 48), 4, 1) == P(None, "fsdp", None)  # fine-tuning's rule


def test_mesh_descriptions_and_errors():
    assert sharding.parse_mesh("data=2,model=4", sharding.INFERENCE_AXES) == {"data": 2, "fsdp": 1, "model": 4}
    with pytest.raises(ValueError, match="bad part 'model=2'.*'data=2,fsdp=4'"):
        sharding.parse_mesh("model=2")  # fine-tuning has no model axis
    with pytest.raises(ValueError, match="bad part 'tensor=2'.*'data=2,model=4'"):
        sharding.mesh_from("tensor=2")
    with pytest.raises(ValueError, match="needs 8 devices, found 1"):
        sharding.mesh_from("data=2,model=4")
    assert sharding.mesh_from(None) is None
    mesh = sharding.mesh_from("data=1")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "model": 1}
    wrong = sharding.Mesh(np.array(mesh.devices).reshape(1, 1), ("x", "y"))
    with pytest.raises(ValueError, match="expected axes"):
        sharding.mesh_from(wrong)


def test_pad_batch_repeats_the_last_example():
    a, b = np.arange(6).reshape(3, 2), np.array([True, False, True])
    pa, pb = sharding.pad_batch([a, b], 4)
    np.testing.assert_array_equal(pa, [[0, 1], [2, 3], [4, 5], [4, 5]])
    np.testing.assert_array_equal(pb, [True, False, True, True])
    assert sharding.pad_batch([a], 3)[0] is a


def test_cli_mesh_errors(capsys):
    from paligemma.cli import main as cli

    base = ["generate", "--checkpoint", "x.npz", "--tokenizer", "t.model", "--image", "a.png", "--prompt", "p"]
    assert cli.main(base + ["--mesh", "data=2,tensor=4"]) == 2
    assert "bad part 'tensor=4'" in capsys.readouterr().err
    assert cli.main(base + ["--mesh", "data=2", "--impl", "ref"]) == 2
    assert "--mesh needs --impl fast" in capsys.readouterr().err


# --- 8 virtual devices (subprocess) -------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    assert len(jax.devices()) == 8, jax.devices()
    from paligemma import fast, ref
    from paligemma.fast import decode, gemma, sharding
    from paligemma.fast.policy import FLOAT32, Policy
    from paligemma.ref.params import flatten
    sys.path.insert(0, {bench!r})
    import compile_sharded

    PRESETS, MESHES, EXTRA, folder = {presets!r}, {meshes!r}, {extra!r}, {folder!r}
    start = time.perf_counter()
    def lap(what):
        print(f"{{what}}: {{time.perf_counter() - start:.1f}} s", file=sys.stderr, flush=True)
    def shard_shape(a):
        return list(a.sharding.shard_shape(a.shape))
    rng = np.random.default_rng(0)
    B, T, NEW = 4, 8, 6
    images = rng.uniform(-1, 1, (B, 28, 28, 3)).astype(np.float32)
    tokens = rng.integers(3, 300, (B, T))
    mask_ar = (np.arange(T)[None] >= np.array([[5], [3], [8], [4]])).astype(np.int32)
    input_mask = np.arange(T)[None] < np.array([[8], [6], [8], [7]])
    out = {{"parity": [], "shards": {{}}, "embedding": {{}}, "reads": {{}}}}

    def rel(a, b):
        return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())

    for name in PRESETS:
        config = ref.get_config(name)
        params = ref.init_params(config, seed=1, random_norms=True)
        one = np.asarray(fast.forward(params, config, images, tokens, mask_ar, input_mask), np.float64)
        gen = fast.generate(params, config, images, tokens, mask_ar, input_mask, max_new_tokens=NEW)
        for spec in MESHES + ((EXTRA[1],) if name == EXTRA[0] else ()):
            mesh = sharding.mesh_from(spec)
            placed = sharding.place_params(params, mesh)
            # data=8: the 4 examples are padded to 8 and cut back.
            logits = fast.forward(placed, config, images, tokens, mask_ar, input_mask, mesh=mesh)
            g = fast.generate(placed, config, images, tokens, mask_ar, input_mask, max_new_tokens=NEW, mesh=spec)
            table = placed["llm"]["embedder"]["input_embedding"]
            out["embedding"][f"{{name}} {{spec}}"] = [list(s.data.shape) for s in table.addressable_shards]
            out["parity"].append(dict(preset=name, mesh=spec, logits=rel(logits, one), logits_shard=shard_shape(logits),
                                      tokens=g.tokens.tolist() == gen.tokens.tolist(),
                                      logprobs=rel(g.logprobs, gen.logprobs)))
            lap(f"{{name}} {{spec}}")
        mesh = sharding.mesh_from("data=2,model=4" if name == "tiny-paligemma" else "data=4,model=2")
        placed = sharding.place_params(params, mesh)
        policy = Policy(mesh=mesh)
        rope = gemma.rope_table(64, config.llm.head_dim)
        inputs = sharding.on_mesh(placed, [images, tokens.astype(np.int32), mask_ar, input_mask], FLOAT32, mesh)[1]
        cache, last = jax.jit(lambda p, *a: decode.prefill(p, config, *a, NEW, policy, rope))(placed, *inputs)
        shards = {{k: shard_shape(v) for k, v in flatten(placed).items()}}
        shards["cache/k"], shards["last_logits"] = shard_shape(cache.k), shard_shape(last)
        shards["full/cache/k"] = list(cache.k.shape)
        out["shards"][name] = shards
        lap(f"{{name}} shardings")

    # Loading: every read is one device's shard, never a whole tensor (a `Watched` leaf refuses
    # to be read whole), and the placed arrays hold the checkpoint's values.
    config = ref.get_config("tiny-paligemma2")
    ref.save(os.path.join(folder, "m.npz"), config, ref.init_params(config, seed=2))
    _, loaded = ref.load(os.path.join(folder, "m.npz"))

    class Watched:
        def __init__(self, path, a):
            self.path, self.a, self.shape, self.dtype = path, a, a.shape, a.dtype
        def __getitem__(self, index):
            part = self.a[index]
            reads = out["reads"].setdefault(self.path, [])
            reads.append(int(np.prod(part.shape)) * part.dtype.itemsize)
            return part
        def __array__(self, *args, **kwargs):
            raise AssertionError(f"{{self.path}} read whole")

    flat = flatten(loaded)
    assert all(isinstance(a, np.memmap) for a in flat.values()), "ref.load no longer memory-maps .npz"
    watched = ref.params.unflatten({{k: Watched(k, a) for k, a in flat.items()}})
    placed = flatten(sharding.place_params(watched, sharding.mesh_from("data=2,model=4")))
    out["shard_bytes"] = {{k: max(s.data.nbytes for s in v.addressable_shards) for k, v in placed.items()}}
    out["whole_bytes"] = {{k: int(a.nbytes) for k, a in flat.items()}}
    out["values_equal"] = all(np.array_equal(np.asarray(placed[k]), np.asarray(flat[k])) for k in flat)
    lap("loading")

    # The Pallas kernels under shard_map (interpret mode): kv heads sliced per device (K = 2 < 4
    # for tiny-paligemma2), replicated (K = 1).
    out["pallas"] = []
    for name in ("tiny-paligemma", "tiny-paligemma2"):
        config = ref.get_config(name)
        params = ref.init_params(config, seed=1, random_norms=True)
        policy = Policy(attention_impl="pallas_interpret")
        gen = fast.generate(params, config, images, tokens, mask_ar, input_mask, max_new_tokens=3)
        g = fast.generate(params, config, images, tokens, mask_ar, input_mask, max_new_tokens=3, policy=policy,
                          mesh="data=2,model=4")
        out["pallas"].append(dict(preset=name, tokens=g.tokens.tolist() == gen.tokens.tolist(),
                                  logprobs=rel(g.logprobs, gen.logprobs)))
        lap(f"pallas {{name}}")

    # The compile-only plan of bench/compile_sharded.py on these 8 devices, tiny model.
    mesh = compile_sharded.target_mesh("cpu", "data=2,model=4")
    out["plan"] = compile_sharded.plan(ref.get_config("tiny-paligemma2"), mesh, 2, 16, 8, "xla")
    lap("plan")

    # The command line.
    from paligemma.cli import main as cli
    from PIL import Image
    tok = ref.train_tiny_tokenizer(os.path.join(folder, "tok.model"))
    config = ref.get_config("tiny-paligemma2", vocab_size=tok.vocab_size)
    ref.save(os.path.join(folder, "cli.npz"), config, ref.init_params(config, seed=0, random_norms=True))
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(os.path.join(folder, "a.png"))
    argv = ["generate", "--checkpoint", os.path.join(folder, "cli.npz"), "--tokenizer", os.path.join(folder, "tok.model"),
            "--image", os.path.join(folder, "a.png"), "--prompt", "caption en", "--prompt", "ocr", "--json",
            "--show-tokens", "--quiet", "--max-new-tokens", "6"]
    for extra in ([], ["--mesh", "data=2,model=4"]):
        code = cli.main(argv + extra)
        assert code == 0, code
    lap("cli")
    print("@@" + json.dumps(out))
""")


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    script = SCRIPT.format(bench=str(ROOT / "bench"), presets=PRESETS, meshes=MESHES, extra=EXTRA, folder=str(folder))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=1200)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("@@")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-5000:]
    out = json.loads(line[2:])
    out["stdout"], out["stderr"] = proc.stdout, proc.stderr
    return out


def test_meshes_give_the_one_device_logits_and_tokens(eight):
    assert len(eight["parity"]) == len(PRESETS) * len(MESHES) + 1
    for r in eight["parity"]:
        assert r["logits"] <= FLOAT32_REORDERED.bound(), r
        assert r["logprobs"] <= FLOAT32_REORDERED.bound(), r
        assert r["tokens"], r
        # [B, T, V] = [4, 8, 300] per device: examples over data (data=8: padded to 8, cut back to
        # 4 on one device's worth), vocabulary over model where it divides 300.
        sizes = sharding.parse_mesh(r["mesh"], sharding.INFERENCE_AXES)
        model, batch = sizes["model"], sizes["data"] * sizes["fsdp"]
        expected = [4 // batch if batch <= 4 else 4, 8, 300 // model if 300 % model == 0 else 300]
        assert r["logits_shard"] == expected, r


def test_shardings_follow_the_table(eight):
    """Per-device shapes of placed parameters and of the prefilled cache and logits."""
    one = eight["shards"]["tiny-paligemma"]  # N = 4, K = 1, F = 96, V = 300; data=2, model=4
    assert one["llm/layers/attn/q_einsum/w"] == [2, 1, 48, 16]  # [L, N, D, H]: N / 4
    assert one["llm/layers/attn/kv_einsum/w"] == [2, 2, 1, 48, 16]  # K = 1 < 4: replicated
    assert one["llm/layers/mlp/linear"] == [2, 24, 48]  # [L, F, D]: F / 4
    assert one["llm/embedder/input_embedding"] == [75, 48]  # V / 4
    L, B, S, K, H = one["full/cache/k"]
    assert one["cache/k"] == [L, B // 2, S, K, H]  # examples / 2, K = 1 whole
    assert one["last_logits"] == [2, 75]  # [B, V]: B / 2, V / 4
    two = eight["shards"]["tiny-paligemma2"]  # K = 2; data=4, model=2
    assert two["llm/layers/attn/kv_einsum/w"] == [3, 2, 1, 48, 16]  # K / 2
    L, B, S, K, H = two["full/cache/k"]
    assert two["cache/k"] == [L, B // 4, S, K // 2, H]
    assert two["llm/final_norm/scale"] == [48]


def test_no_device_holds_the_whole_embedding(eight):
    for key, shapes in eight["embedding"].items():
        if "model=1" in key:
            continue
        sizes = sharding.parse_mesh(key.split()[1], sharding.INFERENCE_AXES)
        assert len(shapes) == 8
        for shape in shapes:  # [V, D] = [300, 48]: V / model rows (D / model where V does not divide), fsdp too
            assert shape[0] * shape[1] * sizes["model"] * sizes["fsdp"] == 300 * 48, (key, shapes)
            assert shape[0] == 300 // sizes["model"] or 300 % sizes["model"], (key, shapes)


def test_loading_reads_one_shard_at_a_time(eight):
    assert eight["values_equal"]
    reads, shard, whole = eight["reads"], eight["shard_bytes"], eight["whole_bytes"]
    assert set(reads) == set(whole)
    for key, sizes in reads.items():
        assert max(sizes) <= shard[key], (key, sizes, shard[key])  # never more than one device's shard
    table = "llm/embedder/input_embedding"
    assert max(reads[table]) * 4 == whole[table]  # model=4: a quarter of the rows per read


def test_pallas_kernels_under_shard_map(eight):
    assert [r["preset"] for r in eight["pallas"]] == ["tiny-paligemma", "tiny-paligemma2"]
    for r in eight["pallas"]:
        assert r["tokens"], r
        assert r["logprobs"] <= FLOAT32_REORDERED.bound(), r


def test_cli_mesh_prints_the_one_device_text(eight):
    lines = [json.loads(x) for x in eight["stdout"].splitlines() if x.startswith("{")]
    assert len(lines) == 4  # two prompts, without and with --mesh
    for one, mesh in zip(lines[:2], lines[2:]):
        logprobs = np.array(one.pop("logprobs")), np.array(mesh.pop("logprobs"))
        assert one == mesh  # text, tokens, finished
        np.testing.assert_allclose(*logprobs, rtol=FLOAT32_REORDERED.bound())


def test_compile_plan_on_virtual_devices(eight):
    plan = eight["plan"]
    for stage in ("prefill", "decode"):
        assert plan[stage]["arguments"] > 0 and plan[stage]["total"] >= plan[stage]["arguments"], plan
    assert plan["decode"]["alias"] > 0, plan  # the donated cache is updated in place


def test_compile_plan_on_tpu_v5e_topology():
    if not TPU_PYTHON.exists():
        if os.environ.get("PALIGEMMA_REQUIRE_TPU"):
            pytest.fail(f"{TPU_PYTHON} is missing: `make tpu-env` installs jax[tpu]")
        pytest.skip(f"no TPU compile environment: {TPU_PYTHON} is missing (`make tpu-env`)")
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT / "bench")!r})
        import compile_sharded
        from paligemma.ref.config import get_config
        mesh = compile_sharded.target_mesh("tpu", "data=2,model=4")
        out = {{name: compile_sharded.plan(get_config(name), mesh, 2, 16, 8, "pallas")
               for name in ("tiny-paligemma", "tiny-paligemma2")}}
        print("@@" + json.dumps(out))
    """)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([str(TPU_PYTHON), "-c", script], capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("@@")), None)
    assert line, proc.stderr[-4000:]
    for name, plan in json.loads(line[2:]).items():
        # Prefill and decode compiled (Mosaic kernels under shard_map included). No ratio to the
        # model's bytes here: the TPU pads tiny arrays to (8, 128) tiles, which dominates a tiny
        # model; bench/compile_sharded.py shows 1/8 of the weights per chip for 10B and 28B.
        assert plan["prefill"]["arguments"] > 0 and plan["decode"]["arguments"] > 0, (name, plan)
        assert plan["decode"]["alias"] > 0, (name, plan)  # the donated cache is updated in place
