"""Gemma's SentencePiece tokenizer with PaliGemma's `<locNNNN>` / `<segNNN>` pieces, and the
text layouts big_vision feeds the model.

Training example (`combine_and_keep_train(text_len)`), length `text_len + 1`:

    tokens     [BOS] prefix...  "\\n"  suffix... [EOS]  pad...
    mask_ar      0     0...      0      1...      1      1...
    mask_loss    0     0...      0      1...      1      0...

The trainer feeds `tokens[:-1]`, `mask_ar[:-1]` (length `text_len`) and scores `tokens[1:]`
with weights `mask_loss[1:]`: the loss covers the suffix and its EOS, the "\\n" position
predicting the first suffix token. Truncation keeps the head, so a long suffix loses its EOS.

Decoding prompt (`combine_and_keep_eval(text_len)`, plus an optional forced suffix):

    tokens     [BOS] prefix...  "\\n"  suffix...  pad...
    mask_ar      0     0...      0      1...      1...
    input_mask   1     1...      1      1...      0...

Special ids are looked up by piece, never hard-coded, so the real tokenizer (`<loc0000>` =
256000, `<seg000>` = 257024) and the tiny ones `train_tiny_tokenizer` makes both work.
"""

import io
import os
from typing import NamedTuple

import numpy as np
import sentencepiece as spm

LOC_PIECES = tuple(f"<loc{i:04d}>" for i in range(1024))
SEG_PIECES = tuple(f"<seg{i:03d}>" for i in range(128))


class TrainExample(NamedTuple):
    """One training sequence ([text_len + 1]) or a batch of them ([B, text_len + 1]), int32."""

    tokens: np.ndarray
    mask_ar: np.ndarray  # 0 prefix and "\n", 1 suffix and padding
    mask_loss: np.ndarray  # 1 for suffix tokens (EOS included), 0 elsewhere


class Prompt(NamedTuple):
    """A decoding prompt ([T]) or a batch of them ([B, T]), ready for `generate`."""

    tokens: np.ndarray  # int32
    mask_ar: np.ndarray  # int32: 0 prefix and "\n", 1 forced suffix and padding
    input_mask: np.ndarray  # bool: True for real tokens


def _fit(ids, length, pad_value):
    """`ids` truncated (keeping the head) or padded with `pad_value` to `length`, as int32."""
    ids = list(ids[:length]) + [pad_value] * max(0, length - len(ids))
    return np.asarray(ids, dtype=np.int32)


def _check_length(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")


def _pairs(name, prefixes, suffixes):
    """`(prefixes, suffixes)` as equally long non-empty lists of str."""
    if isinstance(prefixes, str) or isinstance(suffixes, str):
        raise ValueError(f"{name}: expected lists of strings, got a single str")
    prefixes = list(prefixes)
    suffixes = [""] * len(prefixes) if suffixes is None else list(suffixes)
    if len(prefixes) != len(suffixes) or not prefixes:
        raise ValueError(f"{name}: expected as many suffixes as prefixes (>= 1), "
                         f"got {len(prefixes)} prefixes and {len(suffixes)} suffixes")
    return prefixes, suffixes


def _load(model):
    """A loaded `SentencePieceProcessor` and a name for messages, from a path or proto bytes."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        data, name = bytes(model), f"<serialized proto, {len(model)} bytes>"
    else:
        name = os.fspath(model)
        if not os.path.isfile(name):
            raise ValueError(f"tokenizer: {name!r} does not exist or is not a file "
                             "(expected a SentencePiece .model file)")
        with open(name, "rb") as f:
            data = f.read()
    sp = spm.SentencePieceProcessor()
    try:
        if not data:  # SentencePiece would only say "unk is not defined"
            raise RuntimeError("it is empty")
        sp.LoadFromSerializedProto(data)
    except RuntimeError as e:
        raise ValueError(f"tokenizer: {name} is not a SentencePiece model ({e})") from None
    return sp, name


class Tokenizer:
    """A SentencePiece model with Gemma's specials and PaliGemma's loc/seg pieces.

    Args:
      model: path to a `.model` file, or its serialized proto (bytes).
      require_loc_seg: if False, a model without the loc/seg pieces is accepted (plain Gemma);
        `loc_ids` / `seg_ids` then raise.
    Raises:
      ValueError naming the file and the missing piece, if the file is missing, is not a
      SentencePiece model, or lacks `<pad>`, `<eos>`, `<bos>`, a loc/seg piece, or a single-id "\\n".
    """

    def __init__(self, model, require_loc_seg=True):
        self._sp, self.name = _load(model)
        self._pad, self._eos, self._bos = (self._lookup([p])[0] for p in ("<pad>", "<eos>", "<bos>"))
        self._loc = self._seg = self._missing = None
        try:
            self._loc, self._seg = self._lookup(LOC_PIECES), self._lookup(SEG_PIECES)
        except ValueError as e:
            if require_loc_seg:
                raise
            self._missing = e
        newline = self.encode("\n")
        if len(newline) != 1:
            raise ValueError(f'tokenizer: "\\n" encodes to {newline} in {self.name}, expected one id '
                             "(Gemma: 108); the big_vision layout needs a one-token separator")
        self._newline = newline[0]

    def _lookup(self, pieces):
        """Ids of `pieces` as a read-only int32 array; each must exist and encode to itself."""
        sp = self._sp
        ids = np.array([sp.PieceToId(p) for p in pieces], dtype=np.int32)
        for piece, i in zip(pieces, ids):
            # PieceToId answers unk for unknown pieces, so check the way back.
            if sp.IdToPiece(int(i)) != piece:
                raise ValueError(f"tokenizer: piece {piece!r} is not in {self.name}")
        if pieces[0].startswith(("<loc", "<seg")):
            # A loc/seg piece that is not a user-defined symbol is split when it appears in text
            # (and, as a control piece, decodes to "" instead of itself).
            for piece, i, enc in zip(pieces, ids, sp.EncodeAsIds(list(pieces))):
                if enc != [i]:
                    raise ValueError(f"tokenizer: piece {piece!r} (id {i}) in {self.name} encodes to {enc}, "
                                     "expected itself: it must be a user-defined symbol")
        ids.setflags(write=False)
        return ids

    pad_id = property(lambda self: int(self._pad), doc="Id of `<pad>` (Gemma: 0).")
    eos_id = property(lambda self: int(self._eos), doc="Id of `<eos>` (Gemma: 1).")
    bos_id = property(lambda self: int(self._bos), doc="Id of `<bos>` (Gemma: 2).")
    newline_id = property(lambda self: self._newline, doc='Id of "\\n", the prefix/suffix separator (Gemma: 108).')
    vocab_size = property(lambda self: self._sp.GetPieceSize(), doc="Pieces in the model (PaliGemma: 257152).")

    @property
    def loc_ids(self):
        """[1024] int32 ids of `<loc0000>`..`<loc1023>` (PaliGemma: 256000..257023)."""
        if self._loc is None:
            raise ValueError(f"tokenizer: no loc/seg pieces: {self._missing}")
        return self._loc

    @property
    def seg_ids(self):
        """[128] int32 ids of `<seg000>`..`<seg127>` (PaliGemma: 257024..257151)."""
        if self._seg is None:
            raise ValueError(f"tokenizer: no loc/seg pieces: {self._missing}")
        return self._seg

    def __repr__(self):
        return f"Tokenizer({self.name}, vocab_size={self.vocab_size})"

    def encode(self, text):
        """Plain `EncodeAsIds(text)`: no BOS, no EOS. Returns list[int]."""
        if not isinstance(text, str):
            raise ValueError(f"encode: expected a str, got {type(text).__name__}")
        return self._sp.EncodeAsIds(text)

    def decode(self, ids, stop_at_eos=True):
        """Text of `ids` (1-D); loc/seg tokens come back as their literal `<loc0123>` text.

        Args:
          ids: [N] ints in [0, vocab_size).
          stop_at_eos: drop the first EOS and everything after it.
        Returns:
          str (control tokens such as BOS, EOS, pad decode to nothing).
        """
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        if stop_at_eos and self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]  # after the cut: junk past EOS is fine
        if bad:
            raise ValueError(f"decode: ids {bad[:8]} are outside the vocabulary [0, {self.vocab_size})")
        return self._sp.DecodeIds(ids)

    def _parts(self, prefix, suffix):
        """`[BOS] prefix`, `"\\n"`, `suffix`, each tokenized separately as big_vision does."""
        return [self.bos_id] + self.encode(prefix), [self.newline_id], self.encode(suffix)

    def train_example(self, prefix, suffix, text_len):
        """big_vision's `combine_and_keep_train(text_len)` for one example.

        Args:
          prefix: the prompt, e.g. "caption en".
          suffix: the target text; EOS is appended.
          text_len: the model's text length; arrays get `text_len + 1` entries, see the module doc.
        Returns:
          `TrainExample` of [text_len + 1] int32 arrays; padding is pad_id / mask_ar 1 / mask_loss 0.
        """
        _check_length("text_len", text_len)
        head, sep, tail = self._parts(prefix, suffix)
        tail = tail + [self.eos_id]
        n_prefix, length = len(head) + len(sep), text_len + 1
        return TrainExample(
            tokens=_fit(head + sep + tail, length, self.pad_id),
            mask_ar=_fit([0] * n_prefix + [1] * len(tail), length, 1),
            mask_loss=_fit([0] * n_prefix + [1] * len(tail), length, 0),
        )

    def train_batch(self, prefixes, suffixes, text_len):
        """`train_example` for each (prefix, suffix), stacked: `TrainExample` of [B, text_len + 1]."""
        prefixes, suffixes = _pairs("train_batch", prefixes, suffixes)
        rows = [self.train_example(p, s, text_len) for p, s in zip(prefixes, suffixes)]
        return TrainExample(*(np.stack(column) for column in zip(*rows)))

    def prompt(self, prefix, suffix="", text_len=None):
        """big_vision's `combine_and_keep_eval(text_len)`, with an optional forced suffix.

        Args:
          prefix: the prompt, e.g. "detect cat ; dog".
          suffix: text the answer must start with (no EOS), decoded causally (mask_ar 1).
          text_len: pad to this length (default: no padding).
        Returns:
          `Prompt` of [T] arrays, T = text_len or the prompt's length.
        Raises:
          ValueError if the prompt is longer than text_len (a prompt is never truncated).
        """
        if text_len is not None:
            _check_length("text_len", text_len)
        head, sep, tail = self._parts(prefix, suffix)
        n = len(head) + len(sep) + len(tail)
        length = n if text_len is None else text_len
        if n > length:
            raise ValueError(f"prompt: {n} tokens ({len(head)} for BOS + prefix, 1 for \"\\n\", "
                             f"{len(tail)} for the suffix) do not fit text_len {text_len}")
        return Prompt(
            tokens=_fit(head + sep + tail, length, self.pad_id),
            mask_ar=_fit([0] * (len(head) + len(sep)) + [1] * len(tail), length, 1),
            input_mask=_fit([1] * n, length, 0).astype(bool),
        )

    def batch_prompts(self, prefixes, suffixes=None, text_len=None):
        """Prompts left-aligned and right-padded to a common length, for `paligemma.ref.generate`.

        Args:
          prefixes: B strings.
          suffixes: B forced suffixes, or None for none.
          text_len: the common length (default: the longest prompt).
        Returns:
          `Prompt(tokens [B, T] int32, mask_ar [B, T] int32, input_mask [B, T] bool)`.
        """
        prefixes, suffixes = _pairs("batch_prompts", prefixes, suffixes)
        lengths = [len(self.prompt(p, s).tokens) for p, s in zip(prefixes, suffixes)]
        if text_len is not None:
            _check_length("text_len", text_len)
            if max(lengths) > text_len:
                raise ValueError(f"batch_prompts: prompt {int(np.argmax(lengths))} has {max(lengths)} tokens, "
                                 f"more than text_len {text_len}")
        rows = [self.prompt(p, s, text_len or max(lengths)) for p, s in zip(prefixes, suffixes)]
        return Prompt(*(np.stack(column) for column in zip(*rows)))

    def decode_generation(self, tokens):
        """Text of one generated row [N]: everything before the first EOS."""
        return self.decode(tokens, stop_at_eos=True)

    def decode_generations(self, tokens):
        """Texts of generated rows [B, N], e.g. `generate(...).tokens`: list of B str."""
        return [self.decode_generation(row) for row in np.asarray(tokens)]


# --- A tiny tokenizer for tests -----------------------------------------------------------

_WORDS = [w.split() for w in (
    "red green blue white black yellow brown gray orange pink",
    "cat dog car bus tree house man woman child bird horse cow boat sign table chair plate cup",
    "sitting standing running parked lying walking eating holding flying looking",
    "street beach road field kitchen room grass water snow park window",
    "on in near under behind beside at")]


def tiny_corpus(n=400):
    """`3 n` English lines in PaliGemma's task syntax, picked by index arithmetic (no RNG, so
    the same everywhere)."""
    lines = []
    for i in range(n):
        c, t, v, pl, pr, c2, t2 = (ws[(i * k + k) % len(ws)] for ws, k in zip(
            [_WORDS[j] for j in (0, 1, 2, 3, 4, 0, 1)], (3, 7, 5, 11, 13, 19, 17)))
        tasks = ["caption en", f"answer en what color is the {t}?", f"detect {t} ; {t2}", "ocr",
                 f"question en {c}", f"segment {t2}", f"How many {t}s are there? {i % 97}"]
        lines += [f"A {c} {t} {v} {pr} the {pl}.", tasks[i % 7], f"{i * 37 % 1000} {t}s, {c} and {c2}: {v} ({pl})!"]
    return lines


def train_tiny_tokenizer(path, vocab_size=1800, extra_text=None):
    """Trains a small Gemma-like SentencePiece model at `path` (no downloads; ~0.1 s).

    Gemma's settings: BPE, `<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3, `<mask>` 4, byte
    fallback, identity normalisation, no dummy prefix, whitespace kept, digits split. "\\n",
    "\\n\\n" and the 1024 loc + 128 seg pieces are user-defined symbols, one token each (ids
    5..1158 here, not the real 108 and 256000..257151). "\\n\\n" makes `sp(prefix) + sp("\\n")`
    differ from `sp(prefix + "\\n")` when the prefix ends in "\\n", so tests can tell them apart.
    One thread and a fixed corpus make the file bytes reproducible.

    Args:
      path: where to write the `.model` file.
      vocab_size: at most this many pieces (>= ~1460: 1159 fixed + 256 bytes + characters);
        the built-in corpus supports up to ~1900.
      extra_text: more training lines (an iterable of str).
    Returns:
      `Tokenizer` of the written file.
    """
    lines = tiny_corpus() + ([extra_text] if isinstance(extra_text, str) else list(extra_text or []))
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            hard_vocab_limit=False, character_coverage=1.0, num_threads=1, minloglevel=2,
            pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            control_symbols=["<mask>"], user_defined_symbols=["\n", "\n\n", *LOC_PIECES, *SEG_PIECES],
            byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True)
    except RuntimeError as e:
        raise ValueError(f"train_tiny_tokenizer: SentencePiece failed for vocab_size {vocab_size}: {e}") from None
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return Tokenizer(path)
