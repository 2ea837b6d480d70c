"""The data directory, the official download locations and checksums, and atomic downloads.

The data directory is, in order of precedence: the ``data_dir`` argument (a command-line
flag passes it on), the ``BINAX_DATA_DIR`` environment variable, ``~/.cache/binax/datasets``.

A download streams into a temporary file in the destination directory, checks its size,
SHA-256 and (where the publisher gives one) MD5, and only then renames it into place, so a
failed or corrupt download leaves nothing behind and overwrites nothing. Connections use a
short timeout so that, without a network, a download fails fast instead of hanging.
"""

import hashlib
import os
import tempfile
import urllib.request
from typing import NamedTuple

DATA_DIR_ENV = "BINAX_DATA_DIR"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "binax", "datasets")
DEFAULT_TIMEOUT = 10.0
_CHUNK = 1 << 20


class Resource(NamedTuple):
    """One file to fetch: its name, mirrors tried in order, and what it must hash to.

    Attributes:
      filename: the official file name, kept as is in the data directory.
      urls: the download locations, tried in order.
      size: the file size in bytes.
      sha256: the SHA-256 hex digest.
      md5: the MD5 hex digest the publisher gives, or None.
    """

    filename: str
    urls: tuple
    size: int
    sha256: str
    md5: str | None = None


class DownloadError(OSError):
    """Every mirror of a resource failed (no network, HTTP error, or checksum mismatch)."""


def resolve_data_dir(data_dir=None):
    """Return the data directory: ``data_dir``, else ``$BINAX_DATA_DIR``, else the default.

    The result has ``~`` expanded and is absolute; the directory need not exist.
    """
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


_FASHION_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
_MNIST_URLS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


def _resources(bases, table):
    return {
        name: Resource(name, tuple(b + name for b in bases), size, sha256, md5)
        for name, size, sha256, md5 in table
    }


# MD5s: as published by the dataset authors (Fashion-MNIST README, CIFAR page) or, for
# MNIST, as used by torchvision. SHA-256s and sizes: as recorded by TensorFlow Datasets.
FASHION_MNIST_RESOURCES = _resources(
    _FASHION_URLS,
    [
        (
            "train-images-idx3-ubyte.gz",
            26421880,
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        ),
        (
            "train-labels-idx1-ubyte.gz",
            29515,
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "25c81989df183df01b3e8a0aad5dffbe",
        ),
        (
            "t10k-images-idx3-ubyte.gz",
            4422102,
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "bef4ecab320f06d8554ea6380940ec79",
        ),
        (
            "t10k-labels-idx1-ubyte.gz",
            5148,
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "bb300cfdad3c16e7a12a480ee83cd310",
        ),
    ],
)

MNIST_RESOURCES = _resources(
    _MNIST_URLS,
    [
        (
            "train-images-idx3-ubyte.gz",
            9912422,
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        ),
        (
            "train-labels-idx1-ubyte.gz",
            28881,
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "d53e105ee54ea40749a09fcbcd1e9432",
        ),
        (
            "t10k-images-idx3-ubyte.gz",
            1648877,
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "9fb629c4189551a2d022fa330f9573f3",
        ),
        (
            "t10k-labels-idx1-ubyte.gz",
            4542,
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            "ec29112dd5afa0611ce80d1b7f02629c",
        ),
    ],
)

CIFAR10_RESOURCE = _resources(
    (_CIFAR_URL,),
    [
        (
            "cifar-10-binary.tar.gz",
            170052171,
            "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
            "c32a1d4ab5d03f1284b67883e8d87530",
        )
    ],
)["cifar-10-binary.tar.gz"]

CIFAR100_RESOURCE = _resources(
    (_CIFAR_URL,),
    [
        (
            "cifar-100-binary.tar.gz",
            168513733,
            "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec",
            "03b5dce01913d631647c71ecec9e9cb8",
        )
    ],
)["cifar-100-binary.tar.gz"]


def file_digests(path):
    """Return ``(size, sha256 hex, md5 hex)`` of a file, read in chunks."""
    sha256, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha256.update(chunk)
            md5.update(chunk)
            size += len(chunk)
    return size, sha256.hexdigest(), md5.hexdigest()


def check_file(path, resource):
    """Raise DownloadError naming ``path`` unless it matches the resource's checksums."""
    size, sha256, md5 = file_digests(path)
    problems = []
    if size != resource.size:
        problems.append(f"size {size} bytes, expected {resource.size}")
    if sha256 != resource.sha256:
        problems.append(f"SHA-256 {sha256}, expected {resource.sha256}")
    if resource.md5 is not None and md5 != resource.md5:
        problems.append(f"MD5 {md5}, expected {resource.md5}")
    if problems:
        raise DownloadError(f"{path}: checksum mismatch: " + "; ".join(problems))


def _fetch(url, path, timeout):
    with urllib.request.urlopen(url, timeout=timeout) as response, open(path, "wb") as out:
        while chunk := response.read(_CHUNK):
            out.write(chunk)


def download(resource, directory, timeout=DEFAULT_TIMEOUT, verbose=True):
    """Download ``resource`` into ``directory`` atomically and return the file's path.

    Each mirror is tried in turn: the file is written to a temporary name in
    ``directory``, checked against the resource's size and checksums, then renamed to
    ``resource.filename``. A failure removes the temporary file and leaves any file
    already at the destination untouched.

    Args:
      resource: the :class:`Resource` to fetch.
      directory: where to put it (created if missing).
      timeout: seconds to wait on a connection or a read before giving up on a mirror.
      verbose: print one line per mirror tried.

    Raises:
      DownloadError: every mirror failed; the message lists why for each.
    """
    os.makedirs(directory, exist_ok=True)
    dest = os.path.join(directory, resource.filename)
    errors = []
    for url in resource.urls:
        fd, tmp = tempfile.mkstemp(prefix=f".{resource.filename}.", suffix=".part", dir=directory)
        os.close(fd)
        try:
            if verbose:
                print(f"binax: downloading {url} -> {dest}", flush=True)
            _fetch(url, tmp, timeout)
            check_file(tmp, resource)
            os.replace(tmp, dest)
            return dest
        except (OSError, ValueError) as err:  # URLError, timeouts, HTTP errors are OSErrors
            errors.append(f"{url}: {err}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DownloadError(f"could not download {resource.filename}:\n  " + "\n  ".join(errors))
