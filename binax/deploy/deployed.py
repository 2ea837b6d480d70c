"""`Deployed`: a compiled binary network, its file format, `compile` and `load`."""

from __future__ import annotations

import json
import os
import struct
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from binax.deploy import lower as L
from binax.deploy import program as P
from binax.nn import functional as F

__all__ = ["MAGIC", "VERSION", "Deployed", "DeployFileError", "compile", "load"]

MAGIC = b"BINAXDPL"
VERSION = 1
# magic, version (u32), header length (u64), header CRC-32 (u32); then the JSON header, then
# the arrays, each at the offset the header gives, 64-byte aligned.
_PREFIX = struct.Struct("<8sIQI")
_ALIGN = 64
_DTYPES = ("uint8", "int8", "int32", "float32")


class DeployFileError(ValueError):
    """A deployed-model file that cannot be read: not one, truncated, corrupt or too new."""


class Deployed:
    """A binary network compiled for inference: ``deployed(x)`` gives the logits.

    Binary kernels are held bit-packed (1 bit per weight, along the reduction axis); BatchNorm
    followed by a sign is a per-channel integer threshold, so hidden activations stay binary
    from layer to layer; real-valued layers run in float32. On the CPU a binary convolution
    followed by such a threshold runs as XOR + popcount on activations packed 32 channels to a
    word (the kernels are held as such words too); other products of binary
    activations and binary kernels run in int8 with int32 accumulation. Both are exact. See
    `binax.deploy.program`.

    Build with `binax.deploy.compile`, read with `binax.deploy.load`.

    A large batch runs in chunks of `batch_chunk` images, one after the other, so that each
    layer's operands stay in the CPU caches (`binax.deploy.program.CHUNK_NBYTES`,
    ``PACKED_CHUNK_NBYTES``).

    Attributes:
      program: the list of nodes (JSON values).
      arrays: their arrays (NumPy), one dict per node.
      meta: free JSON metadata stored in the file (e.g. the training config).
      batch_chunk: images per chunk; None (the default) chooses the largest power of two whose
        largest activation fits in ``CHUNK_NBYTES`` (``PACKED_CHUNK_NBYTES`` with packed
        convolutions).
      packed: whether binary convolutions followed by a threshold run on packed words (XOR +
        popcount, `binax.deploy.program.Packed`) where they can (the default, on the CPU);
        ``False`` keeps them int8 products. The same values either way.
    """

    def __init__(self, program: list, arrays: list, meta: dict[str, Any] | None = None):
        self.program = program
        self.arrays = arrays
        self.meta = dict(meta or {})
        self.batch_chunk: int | None = None
        self.packed = True
        self._device_arrays = jax.tree.map(jnp.asarray, P.with_kernel_words(program, arrays))
        self._borders: dict[tuple, dict] = {}
        self._compiled: dict[tuple, Any] = {}
        prog = program
        self._forward = jax.jit(
            lambda a, b, x, chunk, packed: F.map_chunks(
                lambda x: P.run(prog, a, x, dict(b), packed=packed), x, chunk
            ),
            static_argnums=(3, 4),
        )
        self._collect = jax.jit(
            lambda a, x, packed: _collect_borders(prog, a, x, packed), static_argnums=2
        )

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays a saved file holds (packed kernels, thresholds, float parameters).

        In memory, the kernels of convolutions that run on packed words are held once more as
        words (1 bit per weight, the input channels padded to whole words of 32).
        """
        return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(self.arrays)))

    def borders(self, image_shape: tuple[int, ...]) -> dict:
        """The border terms of the integer convolutions for images of ``image_shape`` (on packed
        words or not, as `packed` says: their terms differ).

        They depend on the kernels and the image size only, so they are computed once per
        shape (one image's worth of convolutions) and reused for every batch.
        """
        key = (tuple(int(d) for d in image_shape), bool(self.packed))
        if key not in self._borders:
            x = jnp.zeros((1, *key[0]), jnp.float32)
            self._borders[key] = self._collect(self._device_arrays, x, key[1])
        return self._borders[key]

    def chunk(self, image_shape: tuple[int, ...]) -> int:
        """Images per chunk for images of ``image_shape`` (`batch_chunk`, or chosen)."""
        if self.batch_chunk is not None:
            if not (isinstance(self.batch_chunk, int) and self.batch_chunk >= 1):
                raise ValueError(f"batch_chunk must be a positive int, got {self.batch_chunk!r}")
            return self.batch_chunk
        x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
        borders = self.borders(image_shape)
        per_image = P.activation_nbytes(self.program, self._device_arrays, x, borders, self.packed)
        packed = self.packed and P.has_kernel_words(self._device_arrays)
        budget = P.PACKED_CHUNK_NBYTES if packed else P.CHUNK_NBYTES
        return 1 << max(0, (budget // per_image).bit_length() - 1)

    def __call__(self, x: Any) -> jax.Array:
        """Logits for a batch ``x`` (the float model's input layout, e.g. NHWC float images)."""
        if not (isinstance(x, jax.Array) and x.dtype == jnp.float32):
            x = jnp.asarray(x, jnp.float32)
        key = (x.shape, self.batch_chunk, bool(self.packed))
        run = self._compiled.get(key)
        if run is None:  # compiled once per input shape (a direct call dispatches faster)
            if x.ndim < 2:
                raise ValueError(f"x must be a batch (batch, ...), got shape {x.shape}")
            borders = self.borders(x.shape[1:])
            chunk = self.chunk(x.shape[1:])
            compiled = self._forward.lower(
                self._device_arrays, borders, x, chunk, self.packed
            ).compile()
            run = self._compiled[key] = lambda x: compiled(self._device_arrays, borders, x)
        return run(x)

    def summary(self) -> str:
        """One line per node: the op and its array shapes."""
        lines = []

        def walk(program, arrays, indent):
            for node, a in zip(program, arrays, strict=True):
                if node["op"] == "residual":
                    lines.append(f"{indent}residual")
                    walk(node["body"], a["body"], indent + "  body: ")
                    walk(node["shortcut"], a["shortcut"], indent + "  shortcut: ")
                    continue
                shapes = ", ".join(f"{k}{list(np.shape(v))}" for k, v in a.items())
                lines.append(f"{indent}{node['op']} {shapes}".rstrip())

        walk(self.program, self.arrays, "")
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> int:
        """Writes one file (no pickle); returns its size in bytes. See `load`."""
        data = to_bytes(self)
        tmp = f"{os.fspath(path)}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return len(data)


def _collect_borders(program, arrays, x, packed):
    borders: dict = {}
    P.run(program, arrays, x, borders, packed=packed)
    return borders


def compile(  # noqa: A001
    model: Any, variables: Any = None, *, meta: dict[str, Any] | None = None
) -> Deployed:
    """Compiles a trained NNX model of binax layers into a `Deployed` network.

    The model is deployed as it computes in eval mode (BatchNorm with its running statistics).
    Supported: the `binax.models` architectures, `flax.nnx.Sequential` of deployable layers,
    any single deployable layer, classes taught with `binax.deploy.register`, and a Linen
    `flax.linen.Sequential` with its ``variables`` (through `binax.deploy.from_linen`).

    Args:
      model: the trained model (it is not changed).
      variables: the variables of a Linen ``model`` (``params`` and ``batch_stats``).
      meta: JSON metadata to keep in the saved file.

    Raises:
      ValueError: a layer or quantizer without a deployed form (the message names it).
    """
    import flax.linen as nn

    if isinstance(model, nn.Module):
        if variables is None:
            raise ValueError("variables: a Linen model needs its variables (params, batch_stats)")
        model = L.from_linen(model, variables)
    elif variables is not None:
        raise ValueError("variables: only for a Linen model; an NNX model holds its own")
    if not isinstance(model, nnx.Module):
        raise ValueError(f"model must be a Flax NNX module, got {type(model).__name__}")
    program, arrays = L.lower(model)
    program, arrays = P.fold_thresholds(program, arrays)
    return Deployed(program, arrays, meta)


# ---------------------------------------------------------------------------------------------
# File format


def _split(program, arrays, table, chunks, offset):
    """The program with each node's arrays replaced by indices into ``table``."""
    out = []
    for node, a in zip(program, arrays, strict=True):
        if node["op"] == "residual":
            body, offset = _split(node["body"], a["body"], table, chunks, offset)
            short, offset = _split(node["shortcut"], a["shortcut"], table, chunks, offset)
            out.append({**node, "body": body, "shortcut": short})
            continue
        refs = {}
        for key, value in a.items():
            value = np.ascontiguousarray(value)
            if value.dtype.name not in _DTYPES:
                raise ValueError(f"cannot save an array of dtype {value.dtype}")
            offset = -(-offset // _ALIGN) * _ALIGN
            refs[key] = len(table)
            table.append(
                {
                    "dtype": value.dtype.name,
                    "shape": list(value.shape),
                    "offset": offset,
                    "nbytes": value.nbytes,
                }
            )
            chunks.append((offset, value.astype(value.dtype.newbyteorder("<")).tobytes()))
            offset += value.nbytes
        out.append({**node, "arrays": refs})
    return out, offset


def to_bytes(deployed: Deployed) -> bytes:
    """The file contents of `Deployed.save`."""
    table: list = []
    chunks: list = []
    program, size = _split(deployed.program, deployed.arrays, table, chunks, 0)
    payload = bytearray(size)
    for offset, data in chunks:
        payload[offset : offset + len(data)] = data
    header = {
        "format": "binax.deploy",
        "program": program,
        "arrays": table,
        "payload_nbytes": size,
        "payload_crc32": zlib.crc32(payload),
        "meta": deployed.meta,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(head), zlib.crc32(head)) + head + bytes(payload)


def _join(program, table, payload, where):
    nodes, arrays = [], []
    for i, node in enumerate(program):
        op = node.get("op") if isinstance(node, dict) else node
        if op not in P.OPS:
            raise DeployFileError(
                f"{where}: node {i} is not a known op ({op!r}); was the file written by a "
                "newer binax?"
            )
        if node["op"] == "residual":
            body = _join(node["body"], table, payload, where)
            short = _join(node["shortcut"], table, payload, where)
            nodes.append({**node, "body": body[0], "shortcut": short[0]})
            arrays.append({"body": body[1], "shortcut": short[1]})
            continue
        node = dict(node)
        refs = node.pop("arrays", {})
        a = {}
        for key, index in refs.items():
            entry = table[index]
            dtype = np.dtype(entry["dtype"]).newbyteorder("<")
            start, n = entry["offset"], entry["nbytes"]
            if entry["dtype"] not in _DTYPES or n != dtype.itemsize * int(
                np.prod(entry["shape"], dtype=np.int64)
            ):
                raise DeployFileError(f"{where}: array {index} has an inconsistent entry")
            if start < 0 or start + n > len(payload):
                raise DeployFileError(f"{where}: array {index} lies outside the file")
            buf = np.frombuffer(payload, dtype, n // dtype.itemsize, start)
            a[key] = buf.reshape(entry["shape"]).astype(dtype.newbyteorder("="))
        nodes.append(node)
        arrays.append(a)
    return nodes, arrays


def from_bytes(data: bytes, where: str = "<bytes>") -> Deployed:
    """A `Deployed` from the contents of a file written by `Deployed.save`."""
    if len(data) < _PREFIX.size or data[: len(MAGIC)] != MAGIC:
        raise DeployFileError(
            f"{where} is not a binax deployed-model file (it does not start with {MAGIC!r})"
        )
    _, version, head_len, head_crc = _PREFIX.unpack_from(data)
    if version > VERSION:
        raise DeployFileError(
            f"{where} has format version {version}; this binax reads up to {VERSION} "
            "(upgrade binax)"
        )
    head = data[_PREFIX.size : _PREFIX.size + head_len]
    if len(head) != head_len:
        raise DeployFileError(
            f"{where} is truncated: its header needs {head_len} bytes, {len(head)} are there"
        )
    if zlib.crc32(head) != head_crc:
        raise DeployFileError(f"{where} is corrupt: its header fails the CRC-32 check")
    try:
        header = json.loads(head)
        size, crc = int(header["payload_nbytes"]), int(header["payload_crc32"])
        program, table = header["program"], header["arrays"]
    except (ValueError, KeyError, TypeError) as e:
        raise DeployFileError(f"{where} is corrupt: unreadable header ({e})") from None
    payload = data[_PREFIX.size + head_len :]
    if len(payload) != size:
        raise DeployFileError(
            f"{where} is {'truncated' if len(payload) < size else 'corrupt'}: "
            f"{size} bytes of arrays expected, {len(payload)} found"
        )
    if zlib.crc32(payload) != crc:
        raise DeployFileError(f"{where} is corrupt: its arrays fail the CRC-32 check")
    try:
        nodes, arrays = _join(program, table, payload, where)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        if isinstance(e, DeployFileError):
            raise
        raise DeployFileError(f"{where} is corrupt: bad program ({e!r})") from None
    return Deployed(nodes, arrays, header.get("meta"))


def load(path: str | os.PathLike) -> Deployed:
    """Reads a file written by `Deployed.save`.

    Raises:
      DeployFileError: the file is not one, is truncated or corrupt (CRC-32 of header and
        arrays), or comes from a newer format version.
      FileNotFoundError: no such file.
    """
    with open(path, "rb") as f:
        data = f.read()
    return from_bytes(data, os.fspath(path))
