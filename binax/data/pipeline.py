"""Deterministic shuffling, batching, per-process sharding and augmentation.

Everything random here is a pure function of integers given by the caller:

* the order of an epoch is a function of ``(seed, epoch)`` only, so a run resumed at
  epoch ``e``, batch ``b`` sees exactly the batches it would have seen
  (``batches(..., epoch=e, start_batch=b)``);
* the augmentation of an example is a function of ``(seed, epoch, example index)`` only,
  so it does not depend on which batch or which process the example lands in.

Multi-host: every process runs the same :func:`batches` call with its own
``process_index`` and gets its contiguous shard of each global batch; together the
processes see every example of the global batch exactly once.
"""

from typing import NamedTuple

import numpy as np


class Batch(NamedTuple):
    """A batch: ``images`` (B, H, W, C), ``labels`` (B,), and ``indices`` (B,), the
    positions of the examples in the dataset (for per-example augmentation)."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray


def _check_nonneg_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


_GOLDEN = 0x9E3779B97F4A7C15
#: Independent random streams drawn from the same (seed, epoch): the shuffle must not be
#: correlated with the augmentation.
AUGMENT_STREAM = 0
SHUFFLE_STREAM = 1
SPLIT_STREAM = 2


def _mix64(x):
    """SplitMix64 finaliser: a bijective scrambling of uint64 values (wraps mod 2**64)."""
    x = np.asarray(x, np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def example_random_bits(seed, epoch, indices, stream=AUGMENT_STREAM):
    """Return 64 pseudo-random bits per example index.

    A pure function of ``(seed, epoch, stream, index)`` built from SplitMix64 integer
    hashing only, so it gives the same bits on every machine and NumPy version.
    """
    _check_nonneg_int(seed, "seed")
    _check_nonneg_int(epoch, "epoch")
    with np.errstate(over="ignore"):
        key = _mix64(_mix64(np.uint64(seed) + np.uint64(_GOLDEN)) + np.uint64(epoch))
        key = _mix64(key + np.uint64(stream) + np.uint64(_GOLDEN))
        return _mix64(np.asarray(indices, np.uint64) * np.uint64(_GOLDEN) + key)


def epoch_permutation(num_examples, seed, epoch):
    """Return the order of the examples in ``epoch``: a pure function of its arguments.

    The examples are sorted by :func:`example_random_bits` of the shuffle stream, so the
    order is the same on every machine and NumPy version.
    """
    bits = example_random_bits(seed, epoch, np.arange(num_examples), SHUFFLE_STREAM)
    return np.argsort(bits, kind="stable")


def num_batches(num_examples, batch_size, drop_remainder=True):
    """Number of global batches in one epoch."""
    if drop_remainder:
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def shard_bounds(global_size, process_index, process_count):
    """Return ``(start, stop)`` of process ``process_index``'s contiguous shard.

    The ``process_count`` shards split ``range(global_size)`` into consecutive pieces
    that differ in size by at most one and cover every position exactly once.
    """
    if process_count < 1:
        raise ValueError(f"process_count must be >= 1, got {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index}"
        )
    start = process_index * global_size // process_count
    stop = (process_index + 1) * global_size // process_count
    return start, stop


def _arrays(dataset):
    if isinstance(dataset, tuple):
        images, labels = dataset
    else:
        images, labels = dataset.images, dataset.labels
    if len(images) != len(labels):
        raise ValueError(
            f"dataset has {len(images)} images but {len(labels)} labels; expected equal counts"
        )
    return images, labels


def batches(
    dataset,
    batch_size,
    seed,
    epoch,
    drop_remainder=True,
    shuffle=True,
    process_index=0,
    process_count=1,
    start_batch=0,
):
    """Iterate over one epoch in batches, in an order fixed by ``(seed, epoch)``.

    Args:
      dataset: a :class:`binax.data.Dataset`, or an ``(images, labels)`` tuple.
      batch_size: the *global* batch size (summed over processes).
      seed: non-negative integer seed of the shuffle.
      epoch: non-negative epoch number; each epoch has its own order.
      drop_remainder: drop the last, incomplete batch (the default: every batch then
        has the same shape, as ``jit`` wants).
      shuffle: if false, examples come in dataset order (seed and epoch unused).
      process_index: this process's index (``jax.process_index()``).
      process_count: the number of processes (``jax.process_count()``); must divide
        ``batch_size``. Each process gets ``batch_size // process_count`` rows of each
        global batch (an incomplete last batch is split as evenly as it can be).
      start_batch: skip the first ``start_batch`` batches (to resume mid-epoch).

    Yields:
      :class:`Batch` tuples of this process's shard of each global batch.
    """
    images, labels = _arrays(dataset)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size={batch_size} must be divisible by process_count={process_count}"
        )
    shard_bounds(batch_size, process_index, process_count)  # validates the process args
    n = len(labels)
    order = epoch_permutation(n, seed, epoch) if shuffle else np.arange(n)
    for b in range(start_batch, num_batches(n, batch_size, drop_remainder)):
        chunk = order[b * batch_size : (b + 1) * batch_size]
        lo, hi = shard_bounds(len(chunk), process_index, process_count)
        idx = chunk[lo:hi]
        yield Batch(images[idx], labels[idx], idx)


# ---------------------------------------------------------------- augmentation


def random_crop_flip(images, seed, epoch=0, indices=None, pad=4, flip=True):
    """Pad by ``pad`` zeros, take a random crop of the original size, randomly flip.

    The standard CIFAR augmentation of the papers (pad 4, random 32x32 crop, random
    horizontal flip), vectorised in NumPy over the batch. Apply it to raw uint8 images
    (so the padding is black, as in the papers), then :func:`normalize`.

    Args:
      images: (N, H, W, C) array, any dtype.
      seed: non-negative integer seed.
      epoch: non-negative epoch number.
      indices: (N,) the examples' positions in the dataset (``Batch.indices``); the
        crop and flip of an example depend only on ``(seed, epoch, its index)``, not on
        the batch it is in. Default: ``arange(N)``.
      pad: padding on each side; offsets are uniform over ``0 .. 2 * pad``.
      flip: whether to flip horizontally with probability 1/2.

    Returns:
      An array of the same shape and dtype.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC (4-D), got shape {images.shape}")
    n, h, w, _ = images.shape
    if indices is None:
        indices = np.arange(n)
    indices = np.asarray(indices)
    if indices.shape != (n,):
        raise ValueError(f"indices must have shape ({n},), got {indices.shape}")
    bits = example_random_bits(seed, epoch, indices)
    span = np.uint64(2 * pad + 1)
    dy = ((bits & np.uint64(0xFFFF)) % span).astype(np.intp)
    dx = (((bits >> np.uint64(16)) & np.uint64(0xFFFF)) % span).astype(np.intp)
    flipped = flip & (((bits >> np.uint64(32)) & np.uint64(1)) == 1)
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = dy[:, None] + np.arange(h)
    cols = np.where(flipped[:, None], np.arange(w - 1, -1, -1), np.arange(w)) + dx[:, None]
    return _gather_pixels(padded, rows, cols)


def _gather_pixels(images, rows, cols):
    """Return ``out[i, y, x] = images[i, rows[i, y], cols[i, x]]`` for NHWC ``images``.

    Each pixel's channels are viewed as one opaque item, so the fancy indexing moves
    whole pixels (about twice as fast as indexing channel by channel).
    """
    n, _, _, c = images.shape
    pixels = images.view(np.dtype((np.void, c * images.itemsize)))[..., 0]
    out = pixels[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return out.view(images.dtype).reshape(n, rows.shape[1], cols.shape[1], c)
