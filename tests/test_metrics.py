"""binax.flip_metrics and flip_counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import binax


def test_flip_metrics_from_new_params_and_from_updates_agree():
    p = {"a": jnp.array([1.0, -1.0, 1.0, 1.0]), "b": jnp.array([1.0, 1.0]), "bias": jnp.ones(3)}
    new = {
        "a": jnp.array([-1.0, -1.0, -1.0, 1.0]),
        "b": jnp.array([1.0, -1.0]),
        "bias": -jnp.ones(3),
    }
    upd = jax.tree.map(lambda x, y: y - x, p, new)
    is_bin = lambda path: path[-1] != "bias"
    m1 = jax.jit(lambda p, n: binax.flip_metrics(p, n, is_binary=is_bin))(p, new)
    m2 = binax.flip_metrics(p, updates=upd, is_binary=is_bin)
    for m in (m1, m2):
        assert int(m["flips/a"]) == 2 and float(m["flip_ratio/a"]) == 0.5
        assert int(m["flips/b"]) == 1 and float(m["flip_ratio/b"]) == 0.5
        assert int(m["flips"]) == 3 and float(m["flip_ratio"]) == pytest.approx(0.5)
        assert "flips/bias" not in m
    np.testing.assert_array_equal(binax.flip_counts(p, new)["bias"], 3)


def test_flip_metrics_needs_exactly_one_of_new_params_and_updates():
    p = {"a": jnp.ones(2)}
    with pytest.raises(ValueError, match="exactly one"):
        binax.flip_metrics(p)
    with pytest.raises(ValueError, match="exactly one"):
        binax.flip_metrics(p, p, updates=p)
