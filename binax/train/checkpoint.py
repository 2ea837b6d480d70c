"""Checkpoints with Orbax: one per epoch, atomic, checked when read back.

A checkpoint holds the whole `binax.train.step.TrainState` and a JSON record (epoch, config,
history, and the state's `fingerprint`, which catches bytes that changed but still parse)."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from binax._hashing import mix32


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: missing, truncated, corrupt or from another run."""


def _bits(x: jax.Array) -> jax.Array:
    """The bits of each element as uint32 (8-, 16- and 32-bit dtypes)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    unsigned = jnp.dtype(f"uint{8 * x.dtype.itemsize}")
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def fingerprint(tree: Any) -> jax.Array:
    """A uint32 hash of every bit of every leaf of ``tree`` (and of its leaf order), the same
    however the arrays are sharded: integer sums wrap modulo 2**32 in any order."""
    total = jnp.uint32(0)
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        bits = _bits(leaf).reshape(-1)
        pos = jnp.arange(bits.size, dtype=jnp.uint32)
        h = jnp.sum(mix32(bits * jnp.uint32(0x9E3779B1) + pos * jnp.uint32(0x85EBCA77)))
        total = total + mix32(h + jnp.uint32(2 * i + 1))
    return total


class Checkpoints:
    """The checkpoints in ``directory``, one per epoch, the last ``keep`` kept (older ones deleted
    once a newer one is complete); ``create``: make the directory (never when only reading)."""

    def __init__(self, directory: str, keep: int = 2, *, create: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=create,
            # Saves block until written: the train step donates its buffers, and the write
            # must be complete before the program can be interrupted safely.
            enable_async_checkpointing=False,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def epochs(self) -> list[int]:
        """The epochs with a complete checkpoint, in order."""
        self.manager.reload()  # what is on disk now, not what this manager saw last
        return sorted(self.manager.all_steps())

    def save(self, epoch: int, state: Any, meta: dict[str, Any]) -> None:
        """Saves ``state`` (arrays) and ``meta`` (JSON) as the checkpoint of ``epoch``."""
        meta = dict(meta, epoch=int(epoch), fingerprint=int(fingerprint(state)))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(int(epoch), args=args, force=True)
        self.manager.wait_until_finished()

    def restore(self, target: Any, epoch: int | None = None) -> tuple[Any, dict[str, Any]]:
        """The state and record of the checkpoint of ``epoch`` (the latest by default), the
        arrays sharded as ``target`` (a tree like the saved state, of arrays or
        `jax.ShapeDtypeStruct`\\ s); a `CheckpointError` if there is none, it cannot be read, or
        its arrays do not match the fingerprint saved with them (nothing on disk is changed)."""
        epochs = self.epochs()
        if not epochs:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        epoch = epochs[-1] if epoch is None else epoch
        if epoch not in epochs:
            raise CheckpointError(
                f"no checkpoint of epoch {epoch} in {self.directory} (there are: {epochs})"
            )
        where = os.path.join(self.directory, str(epoch))
        advice = (
            f"Nothing was changed. Delete {where} to resume from an earlier checkpoint"
            if len(epochs) > 1
            else f"Nothing was changed. Delete {where} (or the run directory) to start again"
        )
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        )
        try:
            restored = self.manager.restore(epoch, args=args)
            state, meta = restored.state, dict(restored.meta)
        except Exception as e:  # many types for damaged files; ValueError for another structure
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            raise CheckpointError(
                f"the checkpoint {where} cannot be read; it is truncated, corrupt, or from a "
                f"different model or optimizer ({type(e).__name__}: {first_line}). {advice}."
            ) from e
        expected = meta.get("fingerprint")
        actual = int(fingerprint(state))
        if expected != actual:
            raise CheckpointError(
                f"the checkpoint {where} is corrupt: its arrays do not match the fingerprint "
                f"saved with them ({actual} != {expected}). {advice}."
            )
        return state, meta

    def close(self) -> None:
        self.manager.close()
