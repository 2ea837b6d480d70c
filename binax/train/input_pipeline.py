"""The input pipeline: the dataset, its batches as global arrays (each process reads the rows
its devices hold), augmentation and normalisation; batches and augmentation are pure functions
of ``(seed, epoch)``, so a resumed run sees exactly the batches it would have seen."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from binax import data as bdata
from binax.data import text
from binax.train.config import Config, ConfigError
from binax.train.sharding import is_main, process_rows

#: The tokenizer of a text run, in its run directory (`binax.data.text`).
TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass
class InputPipeline:
    """The batches of a run: of ``train_set`` (raw pixels when ``augment``: random crop, pad 4,
    and horizontal flip; else normalised) and ``test_set``, at the global batch sizes, in the
    order and augmentation that ``seed`` gives, placed with the batch ``sharding``."""

    train_set: bdata.Dataset
    test_set: bdata.Dataset
    augment: bool
    batch_size: int
    eval_batch_size: int
    steps_per_epoch: int
    seed: int
    sharding: NamedSharding

    def train_batches(self, epoch: int) -> Iterator[tuple[jax.Array, jax.Array]]:
        """The ``(images, labels)`` global batches of ``epoch`` (0-based)."""
        bs, ds = self.batch_size, self.train_set
        index, count = process_rows(self.sharding, bs)
        stream = bdata.batches(ds, bs, self.seed, epoch, process_index=index, process_count=count)
        for _, b in zip(range(self.steps_per_epoch), stream, strict=False):
            images = b.images
            if self.augment:
                images = bdata.random_crop_flip(images, self.seed, epoch, b.indices)
                images = bdata.normalize(images, ds.mean, ds.std, ds.max_value)
            yield self._global(images, bs), self._global(b.labels, bs)

    def eval_batches(self) -> Iterator[tuple[jax.Array, jax.Array, jax.Array]]:
        """``(images, labels, weights)`` global batches over the test split, in order; the
        last one is padded, with weight 0."""
        n, bs = len(self.test_set), self.eval_batch_size
        padded = math.ceil(n / bs) * bs
        images = np.zeros((padded, *self.test_set.images.shape[1:]), self.test_set.images.dtype)
        labels = np.zeros((padded,), np.int32)
        images[:n], labels[:n] = self.test_set.images, self.test_set.labels
        index, count = process_rows(self.sharding, bs)
        for b in bdata.batches(
            (images, labels), bs, 0, 0, shuffle=False, process_index=index, process_count=count
        ):
            weights = (b.indices < n).astype(np.float32)
            yield self._global(b.images, bs), self._global(b.labels, bs), self._global(weights, bs)

    def _global(self, local: np.ndarray, rows: int) -> jax.Array:
        """The global array of a batch of ``rows`` rows from this process's rows."""
        shape = (rows, *local.shape[1:])
        return jax.make_array_from_process_local_data(self.sharding, local, shape)


def glue_datasets(config: Config) -> tuple[bdata.Dataset, bdata.Dataset]:
    """The train and dev splits of a GLUE task as token ids (`binax.data.text.glue_dataset`) of
    ``max_length`` tokens (a model argument, as ``vocab_size``), with the run's own tokenizer
    (`TOKENIZER_FILE`) when the run exists, else the teacher's (``distill_from``: token ids agree),
    else a WordPiece vocabulary of ``vocab_size`` trained on the train split and saved there."""
    task = config.glue_task
    vocab_size = config.model_kwargs.get("vocab_size", text.DEFAULT_VOCAB_SIZE)
    max_length = config.model_kwargs.get("max_length", text.DEFAULT_MAX_LENGTH)
    path = os.path.join(config.run_dir, TOKENIZER_FILE)
    source = path if os.path.exists(os.path.join(config.run_dir, "config.json")) else None
    if source is None and config.distill_from is not None:
        source = os.path.join(config.distill_from, TOKENIZER_FILE)
    if source is None:
        train = bdata.read_glue(task, "train", config.data_dir)
        tokenizer = text.train_wordpiece(train.text_a + (train.text_b or []), vocab_size)
    elif not os.path.isfile(source):
        raise ConfigError(f"dataset: {source} is missing: the tokenizer of the run it belongs to")
    else:
        tokenizer = text.load_tokenizer(source)
    if tokenizer.get_vocab_size() > vocab_size:
        raise ConfigError(
            f"model_kwargs: vocab_size={vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.get_vocab_size()}, {source})"
        )
    if source != path and is_main():
        os.makedirs(config.run_dir, exist_ok=True)
        tokenizer.save(path)
    try:
        return tuple(
            text.glue_dataset(task, split, config.data_dir, tokenizer, max_length)
            for split in ("train", bdata.glue_task(task).splits[1])  # dev (MNLI: dev_matched)
        )
    except bdata.DataFormatError:
        raise
    except ValueError as e:  # e.g. max_length
        raise ConfigError(f"model_kwargs: {e}") from None


def create(config: Config, sharding: NamedSharding) -> InputPipeline:
    """The input pipeline of ``config`` over the batch ``sharding`` (split along ``"data"``),
    with the test split of ``binax.data.load(..., seed=0)`` whatever the seed. Raises
    `ConfigError` for a batch size the data-parallel devices do not divide, or larger than the
    training set, and `binax.data.load`'s errors."""
    data_size = sharding.mesh.shape["data"]
    if config.batch_size % data_size:
        raise ConfigError(
            f"batch_size={config.batch_size} must be divisible by the number of data-parallel "
            f"devices ({data_size})"
        )
    augment = config.augment if config.augment is not None else config.dataset.startswith("cifar")
    if config.glue_task:
        (train_set, test_set), augment = glue_datasets(config), False
    else:
        kw = dict(data_dir=config.data_dir, download=config.download, seed=0)
        train_set = bdata.load(config.dataset, "train", normalized=not augment, **kw)
        test_set = bdata.load(config.dataset, "test", normalized=True, **kw)
    spe = bdata.num_batches(len(train_set), config.batch_size)
    if spe < 1:
        raise ConfigError(
            f"batch_size={config.batch_size} is larger than the training set ({len(train_set)})"
        )
    spe = min(spe, config.steps_per_epoch or spe)
    eval_batch_size = math.ceil(config.eval_batch_size / data_size) * data_size
    return InputPipeline(
        train_set, test_set, augment, config.batch_size, eval_batch_size, spe, config.seed, sharding
    )
