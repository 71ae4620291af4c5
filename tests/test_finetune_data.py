"""Fine-tuning data (paligemma.fast.data), the mesh rules (paligemma.fast.sharding) and the
`paligemma finetune` command's user errors: no compilation here, so this file is quick."""

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from finetune_fixtures import PREFIX, build, records, write_jsonl
from paligemma import ref
from paligemma.cli import main as cli
from paligemma.fast import data, sharding

TEXT_LEN = 16


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ftdata"))


def _bad_file(files):
    """A file mixing good lines with one of each kind of bad line; returns (path, {line: reason part})."""
    good = records()
    with open(os.path.join(files.dir, "images", "broken.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not really")
    rows = [good[0],                                                        # 1 ok
            '{"image": "images/red.png", "prefix": "x"',                    # 2 invalid JSON
            '["a", "list"]',                                                # 3 not an object
            {"image": "images/red.png", "suffix": "a"},                     # 4 missing prefix
            {"image": "images/red.png", "prefix": 3, "suffix": "a"},        # 5 not a string
            {"image": "images/nope.png", "prefix": PREFIX, "suffix": "a"},  # 6 missing image
            {"image": "images/broken.png", "prefix": PREFIX, "suffix": "a"},  # 7 undecodable image
            {"image": "images/red.png", "prefix": PREFIX, "suffix": "a red cat " * 10},  # 8 too long
            "   ",                                                          # 9 empty
            good[1]]                                                        # 10 ok
    path = write_jsonl(os.path.join(files.dir, "mixed.jsonl"), rows)
    expected = {2: "invalid JSON", 3: "expected a JSON object", 4: "missing key 'prefix'",
                5: "key 'prefix': expected a string", 6: "no such file", 7: "broken.png", 8: "more than text_len",
                9: "empty line"}
    return path, expected


def test_every_bad_line_is_reported_with_file_and_line(files):
    path, expected = _bad_file(files)
    with pytest.raises(data.DataError) as e:
        data.load_examples(path, files.tok, TEXT_LEN)
    assert {b.line: b.file for b in e.value.bad} == {n: path for n in expected}
    for bad in e.value.bad:
        assert expected[bad.line] in bad.reason, str(bad)
        assert str(bad).startswith(f"{path}:{bad.line}: ")
    assert f"{path}: 8 bad line(s): {path}:2: invalid JSON" in str(e.value)

    kept = data.load_examples(path, files.tok, TEXT_LEN, skip_bad=True)  # skip and count
    assert len(kept) == 2 and len(kept.bad) == 8
    assert kept.sources == (f"{path}:1", f"{path}:10")


def test_examples_are_tokenised_as_big_vision_and_paths_resolve(files, tmp_path):
    got = data.load_examples(files.train, files.tok, TEXT_LEN)
    for i, row in enumerate(records()):
        assert got.images[i] == os.path.join(files.dir, row["image"])  # relative to the file
        want = files.tok.train_example(row["prefix"], row["suffix"], TEXT_LEN)
        np.testing.assert_array_equal(got.text[i], want.tokens)
        # Independently: loss exactly on the suffix tokens and EOS.
        n_suffix = len(files.tok.encode(row["suffix"])) + 1
        n_prefix = 1 + len(files.tok.encode(row["prefix"])) + 1
        assert got.mask_loss[i].tolist() == [0] * n_prefix + [1] * n_suffix + [0] * (TEXT_LEN + 1 - n_prefix - n_suffix)
        assert got.text[i, n_prefix + n_suffix - 1] == files.tok.eos_id
    # The same file elsewhere, with --image-root pointing at the images' folder.
    moved = write_jsonl(tmp_path / "moved.jsonl", records())
    with pytest.raises(data.DataError):
        data.load_examples(moved, files.tok, TEXT_LEN)
    rooted = data.load_examples(moved, files.tok, TEXT_LEN, image_root=files.dir)
    assert rooted.images == got.images


@settings(max_examples=20)
@given(st.integers(1, 9), st.integers(0, 100), st.integers(0, 40), st.integers(1, 30), st.integers(1, 30))
def test_data_order_is_a_fresh_permutation_per_epoch_and_resumable(n, seed, start, first, second):
    whole = data.batch_indices(n, seed, start, first + second)
    # Reading in two pieces (an interrupted and resumed run) gives the same stream.
    np.testing.assert_array_equal(whole, np.r_[data.batch_indices(n, seed, start, first),
                                               data.batch_indices(n, seed, start + first, second)])
    epochs = data.batch_indices(n, seed, 0, 3 * n).reshape(3, n)
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))  # every example once per epoch


def test_prefetcher_gives_the_batches_in_order_and_reports_errors(files, tmp_path):
    examples = data.load_examples(files.train, files.tok, TEXT_LEN)
    with data.Prefetcher(examples, 28, batch_size=4, micro_batches=2, seed=3, start=5, stop=9, depth=1) as pre:
        got = list(pre)
    assert [s for s, _ in got] == [5, 6, 7, 8]
    for step, batch in got:
        idx = data.batch_indices(len(examples), 3, step * 4, 4)
        assert batch.images.shape == (2, 2, 28, 28, 3) and batch.text.shape == (2, 2, TEXT_LEN + 1)
        np.testing.assert_array_equal(batch.text.reshape(4, -1), examples.text[idx])
        want = ref.preprocess([examples.images[i] for i in idx], 28)  # [4, 28, 28, 3]
        np.testing.assert_array_equal(batch.images.reshape(want.shape), want)
    # An image that disappears after the check fails the consumer, not silently.
    rows = records()
    os.makedirs(tmp_path / "images")
    for row in rows:
        os.link(os.path.join(files.dir, row["image"]), tmp_path / row["image"])
    late = data.load_examples(write_jsonl(tmp_path / "t.jsonl", rows), files.tok, TEXT_LEN)
    os.remove(tmp_path / rows[2]["image"])
    with pytest.raises(ref.inputs.image.ImageError, match="blue.png"):
        with data.Prefetcher(late, 28, 4, 1, 0, 0, 3) as pre:
            list(pre)


def test_mesh_rules():
    assert sharding.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert sharding.parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8}
    for bad in ("data=0", "model=2", "data=x"):
        with pytest.raises(ValueError, match="mesh: bad part"):
            sharding.parse_mesh(bad)
    P = sharding.PartitionSpec
    # Largest divisible axis, never the stacked layer axis; replicated when nothing divides.
    assert sharding.param_spec("llm/layers/mlp/linear", (4, 96, 48), 4) == P(None, "fsdp", None)
    assert sharding.param_spec("llm/layers/attn/q_einsum/w", (8, 4, 48, 16), 4) == P(None, None, "fsdp", None)
    assert sharding.param_spec("llm/embedder/input_embedding", (1800, 48), 8) == P("fsdp", None)
    assert sharding.param_spec("llm/final_norm/scale", (45,), 4) == P()
    assert sharding.param_spec("llm/layers/pre_ffw_norm/scale", (8, 45), 8) == P()
    assert sharding.param_spec("llm/final_norm/scale", (48,), 1) == P()
    with pytest.raises(ValueError, match="needs 8 devices, found 1.*xla_force_host_platform_device_count=8"):
        sharding.make_mesh({"data": 2, "fsdp": 4})


def test_cli_reports_bad_lines_and_user_errors(files, capsys, tmp_path):
    path, _ = _bad_file(files)
    base = ["finetune", "--checkpoint", files.base, "--tokenizer", files.tok_path, "--out", str(tmp_path / "o"),
            "--text-len", str(TEXT_LEN), "--quiet"]
    assert cli.main(base + ["--train", path]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"paligemma finetune: error: {path}: 8 bad line(s): {path}:2: ")
    assert not os.path.exists(tmp_path / "o" / "checkpoints")  # stopped before training
    cases = [(["--train", str(tmp_path / "missing.jsonl")], "--train"),
             (["--train", files.train, "--mesh", "data=2"], "needs 2 devices"),
             (["--train", files.train, "--batch-size", "3", "--accum-steps", "2"], "accum_steps")]
    for extra, message in cases:
        assert cli.main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert cli.main(["finetune", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no run.json" in capsys.readouterr().err
