"""binax.partition and binary_mask: labels from bool trees and path predicates; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import binax


def params():
    return {
        "conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.zeros(4)},
        "dense": {"kernel": -jnp.ones((8, 3)), "bias": jnp.zeros(3)},
        "bn": {"scale": jnp.ones(4)},
    }


def is_kernel(path):
    return path[-1] == "kernel"


LABELS = {
    "conv": {"kernel": True, "bias": False},
    "dense": {"kernel": True, "bias": False},
    "bn": {"scale": False},
}


def grads(seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params())


@pytest.mark.parametrize("is_binary", [LABELS, is_kernel], ids=["tree", "predicate"])
def test_binary_and_real_leaves_get_their_own_optimizer(is_binary):
    p, g = params(), grads()
    tx = binax.partition(
        binary=binax.bop(threshold=0.0, gamma=1.0), real=optax.adam(1e-2), is_binary=is_binary
    )
    state = tx.init(p)
    u, state = jax.jit(tx.update)(g, state, p)
    # Binary leaves: exactly Bop's update.
    bop = binax.bop(threshold=0.0, gamma=1.0)
    for layer in ("conv", "dense"):
        want, _ = bop.update(g[layer]["kernel"], bop.init(p[layer]["kernel"]), p[layer]["kernel"])
        np.testing.assert_array_equal(u[layer]["kernel"], want)
        assert jnp.any(want != 0)
    # Real leaves: exactly Adam's update on them alone.
    adam = optax.adam(1e-2)
    real_p = {"b1": p["conv"]["bias"], "b2": p["dense"]["bias"], "s": p["bn"]["scale"]}
    real_g = {"b1": g["conv"]["bias"], "b2": g["dense"]["bias"], "s": g["bn"]["scale"]}
    want, _ = adam.update(real_g, adam.init(real_p), real_p)
    np.testing.assert_allclose(u["conv"]["bias"], want["b1"])
    np.testing.assert_allclose(u["dense"]["bias"], want["b2"])
    np.testing.assert_allclose(u["bn"]["scale"], want["s"])
    assert set(state.inner_states) == {"binary", "real"}


def test_binary_mask_forms_agree():
    assert binax.binary_mask(LABELS, params()) == binax.binary_mask(is_kernel, params())


def test_no_binary_leaf_is_an_error():
    with pytest.raises(ValueError, match="no leaf as binary"):
        binax.partition(binax.bop(), optax.adam(1e-3), lambda path: False).init(params())


def test_label_tree_that_does_not_match_is_an_error():
    labels = {"conv": {"kernel": True, "bias": False}, "dense": {"kernel": True}}
    with pytest.raises(ValueError, match="does not match"):
        binax.partition(binax.bop(), optax.adam(1e-3), labels).init(params())


def test_non_bool_labels_are_an_error():
    labels = jax.tree.map(lambda _: "binary", LABELS)
    with pytest.raises(TypeError, match="expected a bool"):
        binax.partition(binax.bop(), optax.adam(1e-3), labels).init(params())
    with pytest.raises(TypeError, match="predicate"):
        binax.partition(binax.bop(), optax.adam(1e-3), lambda p: "yes").init(params())


def test_optimizers_must_be_gradient_transformations():
    with pytest.raises(TypeError, match="real"):
        binax.partition(binax.bop(), "adam", LABELS)


def test_binarize_only_touches_binary_leaves():
    p = {"kernel": jnp.array([0.3, -0.2, 0.0]), "bias": jnp.array([0.3, -0.2, 0.0])}
    out = binax.binarize(p, lambda path: path[-1] == "kernel")
    np.testing.assert_array_equal(out["kernel"], [1.0, -1.0, 1.0])
    np.testing.assert_array_equal(out["bias"], p["bias"])


@pytest.mark.parametrize("name", ["bop", "sgdat", "diode"])
def test_map_params_derives_state_shardings(name):
    """`optax.tree.map_params` (how users turn parameter shardings into state shardings) works
    through `binax.partition`: its placeholder ``init`` is not label-checked."""
    binary = {
        "bop": binax.bop(),
        "sgdat": binax.sgdat(momentum=0.9),
        "diode": binax.diode(),
    }[name]
    tx = binax.partition(binary, optax.adam(1e-3), is_kernel)
    mesh = jax.make_mesh((8,), ("x",))
    replicated = NamedSharding(mesh, P())
    param_shardings = jax.tree.map(lambda _: replicated, params())
    param_shardings["dense"]["kernel"] = NamedSharding(mesh, P("x", None))
    state_shardings = optax.tree.map_params(
        tx,
        lambda leaf, sharding: leaf if isinstance(leaf, optax.MaskedNode) else sharding,
        jax.eval_shape(tx.init, params()),
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )
    state = jax.jit(tx.init, out_shardings=state_shardings)(params())
    dense = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
        if "dense" in jax.tree_util.keystr(path) and leaf.ndim == 2
    ]
    assert len(dense) == {"bop": 1, "sgdat": 3, "diode": 2}[name]  # each copy of the kernel
    assert all(leaf.sharding == param_shardings["dense"]["kernel"] for leaf in dense)
