"""WordPiece tokenization for the text models (needs the ``binax[text]`` extra).

binax tokenizes with Hugging Face's `tokenizers` library (https://github.com/huggingface/tokenizers):
a well-kept, fast (Rust) implementation of BERT's pipeline (lower-casing and accent-stripping
normalizer, whitespace-and-punctuation pre-tokenizer, WordPiece model, ``[CLS] a [SEP] b [SEP]``
template with segment ids, truncation and padding) that can also *train* a WordPiece vocabulary
from text in seconds and saves the whole tokenizer as one JSON file. No pretrained vocabulary
(e.g. ``bert-base-uncased``) can be downloaded where binax is developed, and a binary encoder
trained from scratch does not need one: `train_wordpiece` learns the vocabulary from the task's
training split. A BERT ``vocab.txt`` you have can be used instead (`wordpiece_from_vocab`).

Install with ``pip install 'binax[text]'``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_VOCAB_SIZE",
    "SPECIAL_TOKENS",
    "Encoded",
    "encode",
    "glue_dataset",
    "load_tokenizer",
    "train_wordpiece",
    "wordpiece_from_vocab",
]

#: BERT's special tokens; ``[PAD]`` gets id 0 (`binax.models.BinaryEncoder`'s ``pad_id``).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
#: The defaults of ``binax-train --model encoder``: vocabulary size and sequence length.
DEFAULT_VOCAB_SIZE, DEFAULT_MAX_LENGTH = 8192, 128


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError(
            "binax.data.text needs the Hugging Face `tokenizers` package: "
            "pip install 'binax[text]' (or pip install tokenizers)"
        ) from None
    return tokenizers


def _bert_pipeline(model: Any, lowercase: bool) -> Any:
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(model)
    tokenizer.normalizer = tk.normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = tk.decoders.WordPiece()
    return tokenizer


def _add_template(tokenizer: Any) -> Any:
    tk = _tokenizers()
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls is None or sep is None:
        raise ValueError("the vocabulary must contain the special tokens [CLS] and [SEP]")
    tokenizer.post_processor = tk.processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return tokenizer


def train_wordpiece(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    *,
    min_frequency: int = 2,
    lowercase: bool = True,
) -> Any:
    """Trains a BERT-style WordPiece tokenizer on ``texts``.

    Args:
      texts: the training text (e.g. ``examples.text_a + examples.text_b`` of a GLUE train
        split; never the dev or test split).
      vocab_size: the vocabulary size, special tokens included.
      min_frequency: pieces seen fewer times are not added.
      lowercase: lower-case and strip accents (BERT "uncased").

    Returns:
      A `tokenizers.Tokenizer`; ``[PAD]`` is id 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3.
      Save it with ``tokenizer.save(path)``, load it with `load_tokenizer`.

    Raises:
      ValueError: ``vocab_size`` not larger than the number of special tokens.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}"
        )
    tk = _tokenizers()
    tokenizer = _bert_pipeline(tk.models.WordPiece(unk_token="[UNK]"), lowercase)
    trainer = tk.trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _add_template(tokenizer)


def wordpiece_from_vocab(vocab_file: str | os.PathLike, *, lowercase: bool = True) -> Any:
    """A BERT tokenizer from an existing WordPiece ``vocab.txt`` (one token per line)."""
    tk = _tokenizers()
    model = tk.models.WordPiece.from_file(os.fspath(vocab_file), unk_token="[UNK]")
    return _add_template(_bert_pipeline(model, lowercase))


def load_tokenizer(path: str | os.PathLike) -> Any:
    """A tokenizer saved with ``tokenizer.save(path)``."""
    return _tokenizers().Tokenizer.from_file(os.fspath(path))


class Encoded(NamedTuple):
    """Token ids of a batch of examples, padded to one length (all ``(n, max_length)`` int32)."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    attention_mask: np.ndarray


def encode(
    tokenizer: Any,
    text_a: Sequence[str],
    text_b: Sequence[str] | None = None,
    *,
    max_length: int = 128,
) -> Encoded:
    """Encodes single texts or pairs as ``[CLS] a [SEP] (b [SEP])``, truncated and padded.

    Pairs are truncated longest-first to ``max_length`` tokens in all; shorter sequences are
    padded with ``[PAD]`` (id 0, attention mask 0). The tokenizer's own truncation and padding
    settings are restored afterwards.

    Raises:
      ValueError: ``text_b`` of a different length than ``text_a``, or ``max_length`` too small
        for the special tokens.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 4:
        raise ValueError(f"max_length must be an int >= 4, got {max_length!r}")
    if text_b is not None and len(text_b) != len(text_a):
        raise ValueError(
            f"text_b has {len(text_b)} texts but text_a has {len(text_a)}: one per example"
        )
    saved = tokenizer.truncation, tokenizer.padding
    tokenizer.enable_truncation(max_length=max_length)
    pad_id = tokenizer.token_to_id("[PAD]")
    tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, length=max_length)
    inputs = list(text_a) if text_b is None else list(zip(text_a, text_b, strict=True))
    try:
        batch = tokenizer.encode_batch(inputs)
    finally:  # leave the tokenizer's own settings as they were
        tokenizer.no_truncation() if saved[0] is None else tokenizer.enable_truncation(**saved[0])
        tokenizer.no_padding() if saved[1] is None else tokenizer.enable_padding(**saved[1])
    as_array = lambda attr: np.array([getattr(e, attr) for e in batch], np.int32).reshape(
        len(batch), max_length
    )
    return Encoded(as_array("ids"), as_array("type_ids"), as_array("attention_mask"))


def glue_dataset(
    task: str, split: str, data_dir: str | os.PathLike, tokenizer: Any, max_length: int
) -> Any:
    """One GLUE split, tokenized, as a `binax.data.Dataset` for the training input pipeline.

    Its ``images`` are int32 ``(n, 3, max_length)``: each example's token ids, token types and
    attention mask (`encode`) stacked, which `binax.models.BinaryEncoder` takes as one array.

    Args:
      task, split, data_dir: as `binax.data.read_glue`.
      tokenizer: from `train_wordpiece` (on the train split) or `load_tokenizer`.
      max_length: tokens per example, special tokens included.

    Raises:
      ValueError: a regression task (STS-B: its labels are scores, not classes), or a split
        without labels (the test files).
      DatasetNotFoundError, DataFormatError: from `binax.data.read_glue`.
    """
    from binax.data.datasets import Dataset
    from binax.data.glue import glue_task, read_glue

    spec = glue_task(task)
    if spec.labels is None:
        raise ValueError(
            f"task: {spec.name} is a regression task (similarity scores), not classification"
        )
    examples = read_glue(task, split, data_dir)
    if examples.labels is None:
        raise ValueError(f"split: {spec.name} {split} has no labels (a test file)")
    tokens = encode(tokenizer, examples.text_a, examples.text_b, max_length=max_length)
    return Dataset(
        name=f"glue/{task}",
        split=split,
        images=np.stack(tokens, axis=1),
        labels=examples.labels.astype(np.int32),
        num_classes=spec.num_classes,
        mean=(0.0,),
        std=(1.0,),
        max_value=1,
        normalized=True,
        source=(os.fspath(data_dir),),
    )
