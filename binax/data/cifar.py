"""Reader for the official *binary* versions of CIFAR-10 and CIFAR-100.

Each file is a sequence of fixed-size records: the label byte(s), then 3072 pixel bytes
(1024 red, 1024 green, 1024 blue, each a 32x32 image in row-major order). CIFAR-10
records have 1 label byte (the class, 0..9); CIFAR-100 records have 2 (coarse 0..19,
then fine 0..99). Nothing is ever unpickled: the Python versions of the datasets are
not read at all.

The files can be read from the extracted directories (``cifar-10-batches-bin/``,
``cifar-100-binary/``) or straight out of the ``.tar.gz`` archives, in memory.
"""

import os
import tarfile
import zlib

import numpy as np

from binax.data.errors import DataFormatError

IMAGE_SHAPE_CHW = (3, 32, 32)
PIXEL_BYTES = 3 * 32 * 32

#: Official member names of the two archives, per split.
CIFAR10_DIR = "cifar-10-batches-bin"
CIFAR10_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
CIFAR100_DIR = "cifar-100-binary"
CIFAR100_FILES = {"train": ("train.bin",), "test": ("test.bin",)}


def parse_cifar_records(data, label_bytes, name="<bytes>"):
    """Parse CIFAR binary records into ``(images NHWC uint8, labels (N, label_bytes) int32)``.

    Args:
      data: the file contents.
      label_bytes: 1 for CIFAR-10, 2 for CIFAR-100 (coarse, fine).
      name: how to name the data in error messages (usually the file path).

    Raises:
      DataFormatError: empty data, or a length that is not a whole number of records.
    """
    record = label_bytes + PIXEL_BYTES
    if len(data) == 0 or len(data) % record:
        raise DataFormatError(
            f"{name}: truncated or corrupt CIFAR binary file: {len(data)} bytes is not a "
            f"positive multiple of the {record}-byte record ({label_bytes} label byte(s) "
            f"+ {PIXEL_BYTES} pixel bytes)"
        )
    rows = np.frombuffer(data, np.uint8).reshape(-1, record)
    labels = rows[:, :label_bytes].astype(np.int32)
    images = rows[:, label_bytes:].reshape((-1, *IMAGE_SHAPE_CHW)).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _check_labels(labels, limits, name):
    """Raise DataFormatError if any label column is outside ``[0, limit)``."""
    for column, limit in enumerate(limits):
        top = int(labels[:, column].max())
        if top >= limit:
            raise DataFormatError(
                f"{name}: label byte {column} has value {top}, expected < {limit} "
                "(wrong dataset, or a corrupt file?)"
            )


def read_cifar_file(path, label_bytes):
    """Read one CIFAR binary file; see :func:`parse_cifar_records`."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        return parse_cifar_records(f.read(), label_bytes, name=path)


def read_tar_members(archive, member_names):
    """Return ``{name: bytes}`` for the members of a ``.tar.gz`` with those base names.

    Reads in memory; nothing is extracted to disk. Members are matched by their path's
    last component, wherever they sit inside the archive.

    Raises:
      DataFormatError: the archive is corrupt or truncated, or lacks a wanted member.
    """
    archive = os.fspath(archive)
    wanted = set(member_names)
    found = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted:
                    found[base] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise DataFormatError(f"{archive}: truncated or corrupt archive ({err})") from err
    missing = sorted(wanted - set(found))
    if missing:
        raise DataFormatError(f"{archive}: archive lacks {', '.join(missing)}")
    return found


def _concat(parts):
    images, labels = zip(*parts, strict=True)
    return np.concatenate(images), np.concatenate(labels)


def _read_cifar(files, label_bytes, limits, directory=None, archive=None):
    """Read and concatenate the given files from a directory or a tar.gz archive."""
    if archive is not None:
        blobs = read_tar_members(archive, files)
        parts = []
        for f in files:
            name = f"{os.fspath(archive)}:{f}"
            parts.append(parse_cifar_records(blobs[f], label_bytes, name=name))
            _check_labels(parts[-1][1], limits, name)
        return _concat(parts)
    parts = []
    for f in files:
        path = os.path.join(directory, f)
        parts.append(read_cifar_file(path, label_bytes))
        _check_labels(parts[-1][1], limits, path)
    return _concat(parts)


def read_cifar10(split, directory=None, archive=None):
    """Read a CIFAR-10 split from ``directory`` (``cifar-10-batches-bin/``) or ``archive``.

    Args:
      split: "train" (data_batch_1..5.bin) or "test" (test_batch.bin).
      directory: the extracted ``cifar-10-batches-bin`` directory; or
      archive: the ``cifar-10-binary.tar.gz`` file (read in memory).

    Returns:
      ``(images, labels)``: uint8 images of shape (N, 32, 32, 3), int32 labels (N,).
    """
    images, labels = _read_cifar(CIFAR10_FILES[split], 1, (10,), directory, archive)
    return images, labels[:, 0]


def read_cifar100(split, directory=None, archive=None, label="fine"):
    """Read a CIFAR-100 split from ``directory`` (``cifar-100-binary/``) or ``archive``.

    Args:
      split: "train" (train.bin) or "test" (test.bin).
      directory: the extracted ``cifar-100-binary`` directory; or
      archive: the ``cifar-100-binary.tar.gz`` file (read in memory).
      label: "fine" (100 classes), "coarse" (20 superclasses) or "both" ((N, 2) array of
        coarse, fine).

    Returns:
      ``(images, labels)``: uint8 images of shape (N, 32, 32, 3), int32 labels.
    """
    columns = {"coarse": 0, "fine": 1, "both": slice(None)}
    if label not in columns:
        raise ValueError(f"label must be one of {sorted(columns)}, got {label!r}")
    images, labels = _read_cifar(CIFAR100_FILES[split], 2, (20, 100), directory, archive)
    return images, np.ascontiguousarray(labels[:, columns[label]])
