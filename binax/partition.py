"""Split a model's parameters into binary and real-valued ones, each with its own optimizer."""

from __future__ import annotations

import sys
from typing import Any

import jax
import numpy as np
import optax

from binax._ops import path_str, path_tuple, sign0

BINARY = "binary"
REAL = "real"

IsBinary = Any  # a tree of bools, a predicate on the leaf's path, or a Flax NNX model/state.


def _from_nnx(obj: Any, *, labels: bool) -> Any:
    """A Flax NNX model or state as labels (`binax.nn.binary_labels`) or as plain arrays.

    Anything else is returned as it is. Flax is never imported here: an NNX object can only exist
    once ``flax.nnx`` is loaded, so this code stays Optax-only for everyone else.
    """
    nnx = sys.modules.get("flax.nnx")
    if nnx is None or not isinstance(obj, (nnx.Module, nnx.State)):
        return obj
    if labels:
        from binax.nn import binary_labels

        return binary_labels(obj)
    return nnx.as_pure(obj)


def _is_map_params_placeholder(tree: Any) -> bool:
    """True for the leafless stand-in that `optax.tree.map_params` passes to ``init`` to find
    the copies of the params in a state (a private Optax class, recognised by name)."""
    cls = type(tree)
    return cls.__name__ == "_ParamsPlaceholder" and cls.__module__.startswith("optax")


def _as_bool(x: Any, where: str) -> bool:
    if isinstance(x, (bool, np.bool_)) or (
        isinstance(x, (np.ndarray, jax.Array)) and x.shape == () and x.dtype == bool
    ):
        return bool(x)
    raise TypeError(f"is_binary: expected a bool at {where}, got {x!r}")


def binary_mask(is_binary: IsBinary, tree: Any) -> Any:
    """The tree of bools (same structure as ``tree``) that marks its binary leaves.

    Args:
      is_binary: one of
        * a tree of bools with exactly the structure of ``tree``;
        * a predicate called with each leaf's path as a tuple of keys, e.g.
          ``lambda path: path[-1] == "kernel"``;
        * a Flax NNX model or state: leaves of type `binax.nn.BinaryParam` are binary.
      tree: the params (or updates) to label.

    Raises:
      ValueError: the label tree does not match ``tree``, or no leaf is binary.
      TypeError: a label is not a bool.
    """
    is_binary = _from_nnx(is_binary, labels=True)
    tree = _from_nnx(tree, labels=False)  # nnx.Optimizer passes its init a tree of Variables
    if callable(is_binary):
        pred = is_binary

        def label(path, _):
            value = pred(path_tuple(path))
            return _as_bool(value, f"the predicate's value for {path_str(path)}")

        mask = jax.tree_util.tree_map_with_path(label, tree)
    else:
        want, got = jax.tree.structure(tree), jax.tree.structure(is_binary)
        if want != got:
            raise ValueError(
                "is_binary: the label tree does not match the params:\n"
                f"  labels: {got}\n  params: {want}"
            )
        mask = jax.tree_util.tree_map_with_path(
            lambda path, x: _as_bool(x, path_str(path)), is_binary
        )
        mask = jax.tree.unflatten(want, jax.tree.leaves(mask))
    if not any(jax.tree.leaves(mask)):
        raise ValueError(
            "is_binary marks no leaf as binary: a BNN optimizer would train nothing. Check the "
            "labels or predicate (paths look like "
            f"{[path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)[:3]]})."
        )
    return mask


def binarize(params: Any, is_binary: IsBinary | None = None) -> Any:
    """Replaces each binary leaf by its ``sign0`` (+1 where >= 0, else -1), keeping its dtype.

    Use it to start a flip-rule optimizer from exactly binary weights when the model initialises
    its binary kernels with real values. ``is_binary`` as in `binary_mask`; ``None`` binarizes
    every leaf.
    """
    mask = (
        jax.tree.map(lambda _: True, params)
        if is_binary is None
        else binary_mask(is_binary, params)
    )
    return jax.tree.map(lambda p, m: sign0(p) if m else p, params, mask)


def partition(
    binary: optax.GradientTransformation,
    real: optax.GradientTransformation,
    is_binary: IsBinary,
) -> optax.GradientTransformationExtraArgs:
    """Trains binary leaves with ``binary`` and all other leaves with ``real``.

    A thin layer over `optax.partition` with labels ``"binary"`` and ``"real"`` (the state is an
    `optax.PartitionState` whose ``inner_states`` are keyed by those labels). The labels are
    checked in ``init`` and ``update``: a label tree that does not match the params, or a
    labelling with no binary leaf at all, is an error (a BNN optimizer that matches nothing would
    silently train nothing). To freeze the real-valued leaves pass ``real=optax.set_to_zero()``.

    Args:
      binary: the optimizer for binary leaves, e.g. `binax.bop`.
      real: an ordinary Optax optimizer for the rest, e.g. ``optax.adam(1e-2)``.
      is_binary: a tree of bools, a predicate on the leaf's path (a tuple of keys), or a Flax NNX
        model or state whose `binax.nn.BinaryParam` leaves are binary. See `binary_mask`.

    Examples:
      >>> import jax.numpy as jnp, optax, binax
      >>> params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
      >>> tx = binax.partition(binary=binax.bop(), real=optax.adam(1e-2),
      ...                      is_binary=lambda path: path[-1] == "kernel")
      >>> state = tx.init(params)
    """
    is_binary = _from_nnx(is_binary, labels=True)
    for name, tx in (("binary", binary), ("real", real)):
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(f"{name} must be an optax.GradientTransformation, got {tx!r}")

    def labels(tree):
        if _is_map_params_placeholder(tree):
            return tree  # no leaves, so no labels (optax.masked passes it on unmasked)
        return jax.tree.map(lambda b: BINARY if b else REAL, binary_mask(is_binary, tree))

    return optax.partition({BINARY: binary, REAL: real}, labels)
