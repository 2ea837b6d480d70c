"""Flip statistics of binary weights, computed inside `jit` for logging."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from binax._ops import path_str, sign0
from binax.partition import IsBinary, binary_mask


def flip_counts(params: Any, new_params: Any) -> Any:
    """Per leaf, the number of elements whose sign (``sign0``) differs between the two trees."""
    return jax.tree.map(
        lambda a, b: jnp.sum(sign0(a) != sign0(b), dtype=jnp.int32), params, new_params
    )


def flip_metrics(
    params: Any,
    new_params: Any = None,
    *,
    updates: Any = None,
    is_binary: IsBinary | None = None,
) -> dict[str, jax.Array]:
    """Flip counts and ratios of the binary leaves, as a flat dict for logging.

    Give either the params after the step (``new_params``) or the ``updates`` that produce
    them (``optax.apply_updates(params, updates)``). A flip is a change of ``sign0``, so a
    real-valued leaf being binarized is not counted unless its sign changes.

    Args:
      params: the params before the step.
      new_params: the params after the step.
      updates: the updates of the step (instead of ``new_params``).
      is_binary: which leaves to count, as for `binax.partition`; all leaves when ``None``.

    Returns:
      ``{"flips/<path>": int32, "flip_ratio/<path>": float32, ..., "flips": total int32,
      "flip_ratio": total flips / total binary weights}``. Jittable.
    """
    if (new_params is None) == (updates is None):
        raise ValueError("flip_metrics: give exactly one of `new_params` and `updates`")
    if new_params is None:
        new_params = jax.tree.map(lambda p, u: (p + u).astype(jnp.result_type(p)), params, updates)
    if jax.tree.structure(params) != jax.tree.structure(new_params):
        raise ValueError("flip_metrics: `params` and the new params/updates do not match")
    mask = (
        jax.tree.map(lambda _: True, params)
        if is_binary is None
        else binary_mask(is_binary, params)
    )
    counts = flip_counts(params, new_params)
    out: dict[str, jax.Array] = {}
    total, size = jnp.zeros((), jnp.int32), 0
    for (path, c), p, m in zip(
        jax.tree_util.tree_leaves_with_path(counts),
        jax.tree.leaves(params),
        jax.tree.leaves(mask),
        strict=True,
    ):
        if not m:
            continue
        name = path_str(path)
        n = max(int(jnp.size(p)), 1)
        out[f"flips/{name}"] = c
        out[f"flip_ratio/{name}"] = c.astype(jnp.float32) / n
        total, size = total + c, size + int(jnp.size(p))
    out["flips"] = total
    out["flip_ratio"] = total.astype(jnp.float32) / max(size, 1)
    return out
