"""The tokenizer and big_vision's text layouts, checked against SentencePiece itself and the
rules of `combine_and_keep_train` / `combine_and_keep_eval`; HF's processor layout if installed."""

import io

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given
from hypothesis import strategies as st

from paligemma import ref
from paligemma.ref.inputs.tokenizer import LOC_PIECES, SEG_PIECES, Tokenizer, train_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tiny.model"
    train_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tiny_path):
    return Tokenizer(tiny_path)


@pytest.fixture(scope="module")
def sp(tiny_path):
    """The raw SentencePiece processor: the source of every expected id."""
    return spm.SentencePieceProcessor(model_file=str(tiny_path))


def _train_sp(path, **options):
    """A small SentencePiece model trained directly (for malformed-tokenizer tests)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(sentence_iterator=iter(["a cat sits on the mat", "two dogs run"] * 20),
                                   model_writer=model, vocab_size=2000, model_type="bpe", num_threads=1,
                                   minloglevel=2, hard_vocab_limit=False, **options)
    path.write_bytes(model.getvalue())
    return path


GEMMA_SPECIALS = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                      pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>")
GEMMA = dict(GEMMA_SPECIALS, byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
             remove_extra_whitespaces=False)
ASCII = st.text(alphabet=st.sampled_from([chr(c) for c in range(32, 127)] + ["\n"]), max_size=40)
# Text that may also hold loc/seg markers, as detection and segmentation answers do.
TEXT = st.lists(st.one_of(ASCII, st.sampled_from(LOC_PIECES + SEG_PIECES)), max_size=6).map("".join)


# --- Special ids and round trips ------------------------------------------------------------


def test_special_ids_are_looked_up_by_piece(tok, sp):
    assert [sp.id_to_piece(i) for i in (tok.pad_id, tok.eos_id, tok.bos_id)] == ["<pad>", "<eos>", "<bos>"]
    assert tok.vocab_size == sp.get_piece_size()
    assert [sp.id_to_piece(int(i)) for i in tok.loc_ids] == list(LOC_PIECES)
    assert [sp.id_to_piece(int(i)) for i in tok.seg_ids] == list(SEG_PIECES)
    assert tok.loc_ids.shape == (1024,) and tok.seg_ids.shape == (128,)
    assert len(set(tok.loc_ids) | set(tok.seg_ids)) == 1152
    # The tiny layout is not the real one (256000...), which is the point of looking up by piece.
    assert tok.loc_ids[0] != 256000
    with pytest.raises(ValueError):
        tok.loc_ids[0] = 0  # shared state is read-only


def test_each_loc_seg_piece_and_newline_is_one_token(tok, sp):
    for piece, i in zip(LOC_PIECES + SEG_PIECES, np.concatenate([tok.loc_ids, tok.seg_ids])):
        assert sp.encode(piece) == [i] and tok.encode(piece) == [i]
        assert tok.decode([i]) == piece
    assert sp.encode("\n") == [tok.newline_id] and sp.id_to_piece(tok.newline_id) == "\n"


def test_tiny_tokenizer_is_gemma_like(sp):
    # Gemma's fixed specials (the trainer settings this helper promises).
    assert [sp.id_to_piece(i) for i in range(5)] == ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    assert sp.encode("12") == [sp.piece_to_id("1"), sp.piece_to_id("2")]  # digits split
    assert sp.encode("\n\n") == [sp.piece_to_id("\n\n")]
    assert sp.decode(sp.encode("  a\tb  \n\nc ")) == "  a\tb  \n\nc "  # whitespace kept
    assert len(sp.encode("é")) == 2 and all(sp.is_byte(i) for i in sp.encode("é"))  # byte fallback


def test_tiny_tokenizer_is_deterministic(tmp_path):
    a = train_tiny_tokenizer(tmp_path / "a.model")
    train_tiny_tokenizer(tmp_path / "b.model")
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    extra = train_tiny_tokenizer(tmp_path / "c.model", vocab_size=1500, extra_text=["zebra zebra zebra"] * 50)
    assert extra.vocab_size <= 1500 and a.vocab_size <= 1800


@given(text=TEXT)
def test_decode_round_trips(tok, text):
    ids = tok.encode(text)
    assert ids == tok._sp.EncodeAsIds(text)
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids, dtype=np.int32)) == text


@given(a=TEXT, b=TEXT)
def test_decode_stops_at_eos(tok, a, b):
    ids = tok.encode(a) + [tok.eos_id] + tok.encode(b) + [tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == a
    assert tok.decode(ids, stop_at_eos=False) == a + b  # control tokens decode to nothing
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


# --- Training examples (combine_and_keep_train) --------------------------------------------


@given(prefix=TEXT, suffix=TEXT, text_len=st.integers(1, 48))
def test_train_example_follows_big_vision(tok, sp, prefix, suffix, text_len):
    bos, eos = sp.piece_to_id("<bos>"), sp.piece_to_id("<eos>")
    head = [bos] + sp.encode(prefix) + sp.encode("\n")  # each part tokenized on its own
    tail = sp.encode(suffix) + [eos]
    full, L = head + tail, text_len + 1
    k = min(len(full), L)  # real tokens kept: the head survives truncation
    ex = tok.train_example(prefix, suffix, text_len)
    for a in ex:
        assert a.shape == (L,) and a.dtype == np.int32
    np.testing.assert_array_equal(ex.tokens[:k], full[:k])
    assert (ex.tokens[k:] == sp.piece_to_id("<pad>")).all()
    np.testing.assert_array_equal(ex.mask_ar, np.arange(L) >= len(head))  # pads have mask_ar 1
    np.testing.assert_array_equal(ex.mask_loss, (np.arange(L) >= len(head)) & (np.arange(L) < k))
    assert (eos in ex.tokens) == (len(full) <= L)  # EOS is cut when the text is too long
    # What the trainer sees: inputs [:-1], targets [1:] weighted by mask_loss[1:].
    targets = ex.tokens[1:][ex.mask_loss[1:] == 1]
    np.testing.assert_array_equal(targets, tail[:max(0, k - len(head))])
    if k > len(head):  # the "\n" position predicts the first suffix token
        assert ex.tokens[:-1][ex.mask_loss[1:] == 1][0] == sp.encode("\n")[0]


def test_train_example_small_case_by_hand(tok, sp):
    """`[BOS] caption en \\n a cat [EOS] pad`, written out."""
    bos, eos, pad = (sp.piece_to_id(piece) for piece in ("<bos>", "<eos>", "<pad>"))
    p, s = sp.encode("caption en"), sp.encode("a cat")
    n = 1 + len(p) + 1 + len(s) + 1
    ex = tok.train_example("caption en", "a cat", n + 1)  # two pad positions
    assert ex.tokens.tolist() == [bos, *p, sp.piece_to_id("\n"), *s, eos, pad, pad]
    assert ex.mask_ar.tolist() == [0] * (len(p) + 2) + [1] * (len(s) + 1) + [1, 1]
    assert ex.mask_loss.tolist() == [0] * (len(p) + 2) + [1] * (len(s) + 1) + [0, 0]
    cut = tok.train_example("caption en", "a cat", n - 2)  # one short: EOS gone
    assert cut.tokens.tolist() == ex.tokens[:n - 1].tolist() and eos not in cut.tokens.tolist()


def test_separator_is_tokenized_on_its_own(tok, sp):
    """A prefix ending in "\n": big_vision gives `sp(prefix) + sp("\n")`, not `sp(prefix + "\n")`."""
    bos = sp.piece_to_id("<bos>")
    separate = [bos] + sp.encode("caption en\n") + sp.encode("\n")
    assert separate != [bos] + sp.encode("caption en\n\n")  # "\n\n" is one piece: the layouts differ
    assert tok.train_example("caption en\n", "a", 30).tokens[:len(separate)].tolist() == separate
    assert tok.prompt("caption en\n").tokens.tolist() == separate


def test_train_batch_stacks_examples(tok):
    batch = tok.train_batch(["caption en", "ocr"], ["a cat", "<loc0001> 12"], 9)
    for b, (p, s) in enumerate([("caption en", "a cat"), ("ocr", "<loc0001> 12")]):
        for got, want in zip(batch, tok.train_example(p, s, 9)):
            np.testing.assert_array_equal(got[b], want)
    with pytest.raises(ValueError, match="as many suffixes"):
        tok.train_batch(["a", "b"], ["c"], 9)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="text_len"):
            tok.train_example("a", "b", bad)


# --- Prompts (combine_and_keep_eval) and decoding -------------------------------------------


@given(prefix=TEXT, suffix=TEXT, extra=st.integers(0, 5))
def test_prompt_follows_big_vision(tok, sp, prefix, suffix, extra):
    head = [sp.piece_to_id("<bos>")] + sp.encode(prefix) + sp.encode("\n")
    tail = sp.encode(suffix)  # forced suffix: no EOS
    n = len(head) + len(tail)
    unpadded = tok.prompt(prefix, suffix)
    assert unpadded.tokens.tolist() == head + tail
    assert unpadded.mask_ar.tolist() == [0] * len(head) + [1] * len(tail)
    assert unpadded.input_mask.dtype == bool and unpadded.input_mask.all()
    padded = tok.prompt(prefix, suffix, text_len=n + extra)
    assert padded.tokens.tolist() == head + tail + [sp.piece_to_id("<pad>")] * extra
    assert padded.mask_ar.tolist() == unpadded.mask_ar.tolist() + [1] * extra
    assert padded.input_mask.tolist() == [True] * n + [False] * extra
    with pytest.raises(ValueError, match=f"{n} tokens.*text_len {n - 1}"):
        tok.prompt(prefix, suffix, text_len=n - 1)  # n >= 2: BOS and "\n"


@given(pairs=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=4), forced=st.booleans(), extra=st.integers(0, 3))
def test_batch_prompts_right_pads_each_prompt(tok, pairs, forced, extra):
    prefixes = [p for p, _ in pairs]
    suffixes = [s for _, s in pairs] if forced else None
    rows = [tok.prompt(p, s if forced else "") for p, s in pairs]
    T = max(len(r.tokens) for r in rows)
    for text_len in (None, T + extra):
        batch = tok.batch_prompts(prefixes, suffixes, text_len)
        assert all(a.shape == (len(pairs), text_len or T) for a in batch)
        for b, p in enumerate(prefixes):
            want = tok.prompt(p, suffixes[b] if forced else "", text_len or T)
            for got, w in zip(batch, want):
                np.testing.assert_array_equal(got[b], w)
        np.testing.assert_array_equal(batch.input_mask.sum(1), [len(r.tokens) for r in rows])
    with pytest.raises(ValueError, match=f"text_len {T - 1}"):
        tok.batch_prompts(prefixes, suffixes, T - 1)


def test_batch_prompts_argument_errors(tok):
    with pytest.raises(ValueError, match="as many suffixes"):
        tok.batch_prompts(["a", "b"], ["x"])
    with pytest.raises(ValueError, match="as many suffixes"):
        tok.batch_prompts([])
    with pytest.raises(ValueError, match="single str"):
        tok.batch_prompts("caption en")
    with pytest.raises(ValueError, match="prompt 1 has"):
        tok.batch_prompts(["a", "a much longer prompt than the first"], text_len=6)


@given(text=TEXT, after=st.lists(st.integers(0, 1000), max_size=4), stop=st.booleans())
def test_decode_generation_stops_at_eos(tok, text, after, stop):
    row = np.array(tok.encode(text) + ([tok.eos_id] + [tok.pad_id] * 3 if stop else []), dtype=np.int64)
    assert tok.decode_generation(row) == text
    rows = np.stack([row, np.full_like(row, tok.eos_id)])
    assert tok.decode_generations(rows) == [text, ""]
    if stop and after:  # whatever follows EOS is ignored
        assert tok.decode_generation(np.concatenate([row, after])) == text


def test_prompts_drive_generate_and_decode(tok, sp):
    config = ref.get_config("tiny-paligemma", vocab_size=tok.vocab_size)
    params = ref.init_params(config, seed=0, dtype=np.float64)
    tokens, mask_ar, input_mask = tok.batch_prompts(["caption en", "detect cat ; dog"], ["a", ""])
    images = np.zeros((2, 28, 28, 3))
    out = ref.generate(params, config, images, tokens, mask_ar, input_mask, max_new_tokens=6)
    texts = tok.decode_generations(out.tokens)
    eos = sp.piece_to_id("<eos>")
    for row, text in zip(out.tokens, texts):
        row = row.tolist()
        assert text == sp.decode(row[:row.index(eos)] if eos in row else row)


# --- Errors -------------------------------------------------------------------------------


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="nope.model.*does not exist"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(ValueError, match="does not exist or is not a file"):
        Tokenizer(tmp_path)
    for name, data, why in [("text.model", b"not a sentencepiece model\n", "parse"), ("empty.model", b"", "empty")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=f"(?i){name} is not a SentencePiece model.*{why}"):
            Tokenizer(tmp_path / name)
    with pytest.raises(ValueError, match="serialized proto.*not a SentencePiece model"):
        Tokenizer(b"\x00garbage")


def test_serialized_proto_gives_the_same_tokenizer(tok, tiny_path):
    again = Tokenizer(tiny_path.read_bytes())
    assert again.encode("detect cat <loc0001>") == tok.encode("detect cat <loc0001>")
    np.testing.assert_array_equal(again.seg_ids, tok.seg_ids)


def test_missing_pieces_are_named(tmp_path):
    plain = _train_sp(tmp_path / "plain.model", **GEMMA, user_defined_symbols=["\n"])
    with pytest.raises(ValueError, match=r"'<loc0000>' is not in .*plain\.model"):
        Tokenizer(plain)
    loose = Tokenizer(plain, require_loc_seg=False)  # a plain Gemma-style tokenizer still encodes
    assert loose.decode(loose.encode("a cat\n")) == "a cat\n"
    with pytest.raises(ValueError, match="no loc/seg pieces"):
        loose.loc_ids  # noqa: B018
    loc_only = _train_sp(tmp_path / "loc.model", **GEMMA,
                         user_defined_symbols=["\n", *LOC_PIECES])
    with pytest.raises(ValueError, match=r"'<seg000>' is not in .*loc\.model"):
        Tokenizer(loc_only)
    control = _train_sp(tmp_path / "control.model", **GEMMA,
                        user_defined_symbols=["\n"], control_symbols=[*LOC_PIECES, *SEG_PIECES])
    with pytest.raises(ValueError, match="user-defined symbol"):
        Tokenizer(control)  # present but unusable in text: "<loc0000>" would not encode to itself
    default = _train_sp(tmp_path / "default.model", byte_fallback=True)  # <s>, </s>, no <pad>
    with pytest.raises(ValueError, match=r"'<pad>' is not in .*default\.model"):
        Tokenizer(default)
    squashed = _train_sp(tmp_path / "squashed.model", **GEMMA_SPECIALS, add_dummy_prefix=False,
                         user_defined_symbols=[*LOC_PIECES, *SEG_PIECES])  # "\n" normalised away
    with pytest.raises(ValueError, match=r'"\\n" encodes to \[\]'):
        Tokenizer(squashed)


# --- Hugging Face processor layout -----------------------------------------------------------


def test_hf_processor_layout_matches_train_example(tok, sp):
    """HF's `[<image>*N] [BOS] prefix "\\n" suffix [EOS]` with token_type_ids and labels equals
    our tokens, mask_ar and mask_loss (labels -100 where mask_loss is 0)."""
    transformers = pytest.importorskip("transformers")
    from transformers.tokenization_utils_base import generate_merges

    # Built from the same pieces without protobuf: SentencePiece BPE = HF BPE with merges
    # ranked by piece id (what HF's own .model conversion does, which needs protobuf).
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    hf_tok = transformers.GemmaTokenizer(vocab=vocab, merges=generate_merges(vocab))
    image_processor = transformers.SiglipImageProcessor(size={"height": 28, "width": 28}, image_seq_length=4)
    processor = transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=hf_tok)
    assert processor.image_token_id == tok.vocab_size  # appended after the pieces, as 257152 is
    image = np.zeros((28, 28, 3), np.uint8)
    cases = [("caption en", "a cat sitting on the street."), ("detect cat ; dog", "<loc0012><loc0034> cat ; dog"),
             ("answer en How many cats?", "12"), ("segment  two  cows ", "<loc0001><seg127> x"), ("ocr", "")]
    for prefix, suffix in cases:
        out = processor(images=image, text="<image>" + prefix, suffix=suffix, return_tensors="np")
        keep = out["input_ids"][0] != processor.image_token_id
        assert (~keep).sum() == 4 and not keep[:4].any()
        n = int(keep.sum())
        ex = tok.train_example(prefix, suffix, text_len=n + 2)
        np.testing.assert_array_equal(out["input_ids"][0][keep], ex.tokens[:n])
        np.testing.assert_array_equal(out["token_type_ids"][0][keep], ex.mask_ar[:n])
        np.testing.assert_array_equal(out["labels"][0][keep], np.where(ex.mask_loss[:n] == 1, ex.tokens[:n], -100))
        assert ex.tokens[n - 1] == tok.eos_id and (ex.mask_loss[n:] == 0).all()
        assert processor.decode(out["input_ids"][0][keep], skip_special_tokens=True) == prefix + "\n" + suffix
    # Known difference: HF tokenizes `prefix + "\n"` as one string, big_vision tokenizes the
    # "\n" on its own, so a prefix ending in "\n" gets "\n\n" from HF and "\n", "\n" from us.
    out = processor(images=image, text="<image>caption en\n", suffix="a", return_tensors="np")
    hf = out["input_ids"][0][4:].tolist()
    assert hf == [tok.bos_id] + sp.encode("caption en\n\n") + sp.encode("a") + [tok.eos_id]
    assert hf != tok.train_example("caption en\n", "a", len(hf) - 1).tokens.tolist()
