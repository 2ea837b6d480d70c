"""Reader for the IDX file format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim``
big-endian uint32 dimension sizes, then the values in row-major (C) order, big-endian.
The files are distributed gzipped (``*.gz``); both forms are read, told apart by the gzip
magic bytes ``1f 8b`` rather than by the name.
"""

import gzip
import os
import zlib

import numpy as np

from binax.data.errors import DataFormatError

#: IDX type codes and the NumPy dtypes they stand for (all big-endian).
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

GZIP_MAGIC = b"\x1f\x8b"


def read_file_bytes(path):
    """Return the bytes of ``path``, decompressed when it is gzip (detected by magic bytes).

    Raises:
      DataFormatError: the gzip stream is truncated or corrupt.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise DataFormatError(f"{path}: truncated or corrupt gzip data ({err})") from err


def parse_idx(data, name="<bytes>"):
    """Parse the bytes of an IDX file into a NumPy array in native byte order.

    Args:
      data: the (decompressed) file contents.
      name: how to name the data in error messages (usually the file path).

    Returns:
      An array of the dtype and shape given by the header.

    Raises:
      DataFormatError: bad magic number, unknown dtype code, or a length that does not
        match the dimensions in the header.
    """
    if len(data) < 4:
        raise DataFormatError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    if data[0] != 0 or data[1] != 0:
        raise DataFormatError(
            f"{name}: not an IDX file (magic number starts {data[:4].hex()}, "
            "expected 0000 then dtype code and number of dimensions)"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataFormatError(f"{name}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DataFormatError(f"{name}: IDX header gives 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataFormatError(
            f"{name}: truncated IDX header ({len(data)} bytes, {header_len} needed "
            f"for {ndim} dimensions)"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = header_len + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataFormatError(
            f"{name}: IDX file {what}: {len(data)} bytes, expected {expected} for shape "
            f"{shape} of {dtype.name}"
        )
    array = np.frombuffer(data, dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def read_idx(path):
    """Read an IDX file (gzipped or not) into a NumPy array; see :func:`parse_idx`."""
    return parse_idx(read_file_bytes(path), name=os.fspath(path))


def read_idx_images_labels(images_path, labels_path):
    """Read an MNIST-style pair of IDX files into ``(images NHWC uint8, labels int32)``.

    Checks that the images are a 3-D uint8 array, the labels a 1-D uint8 array, and
    that both hold the same number of examples.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataFormatError(
            f"{os.fspath(images_path)}: expected 3-D uint8 images (count, rows, cols), "
            f"got {images.ndim}-D {images.dtype}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataFormatError(
            f"{os.fspath(labels_path)}: expected 1-D uint8 labels, "
            f"got {labels.ndim}-D {labels.dtype}"
        )
    if len(images) != len(labels):
        raise DataFormatError(
            f"{os.fspath(images_path)} holds {len(images)} images but "
            f"{os.fspath(labels_path)} holds {len(labels)} labels"
        )
    return images[..., None], labels.astype(np.int32)
