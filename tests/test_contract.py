"""The Optax contract, as Optax's own contrib tests check it, for every binax optimizer."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import binax

# Hyperparameters chosen so that flips happen within a few steps of the gradients below.
OPTIMIZERS = {
    "bop": (binax.bop, dict(threshold=1e-6, gamma=1e-2)),
    "bop2nd_order": (binax.bop2nd_order, dict(threshold=1e-2, gamma=1e-2, sigma=1e-2)),
    "bop2nd_order_adam": (
        binax.bop2nd_order,
        dict(threshold=0.3, gamma=1e-2, sigma=1e-2, bias_correction="adam"),
    ),
    "sgdat": (binax.sgdat, dict(learning_rate=1e-2, threshold=1e-6, eps=1e-9)),
    "sgdat_momentum": (
        binax.sgdat,
        dict(learning_rate=1e-2, threshold=1e-6, momentum=0.9, flip_count_reset_every=5),
    ),
    "diode": (binax.diode, dict(learning_rate=1e-3, b1=0.9, b2=0.5, init_scale=1e-3)),
    "cema": (binax.cema, dict(gamma=1e-2, alpha=0.5)),
    # bfloat16 state with stochastic rounding (random bits inside the update)
    "bop_bf16_stochastic": (
        binax.bop,
        dict(threshold=1e-6, gamma=1e-2, state_dtype=jnp.bfloat16, rounding="stochastic"),
    ),
    "sgdat_momentum_bf16_stochastic": (
        binax.sgdat,
        dict(
            learning_rate=1e-2,
            threshold=1e-6,
            momentum=0.9,
            state_dtype=jnp.bfloat16,
            rounding="stochastic",
        ),
    ),
    "diode_bf16_stochastic": (
        binax.diode,
        dict(
            learning_rate=1e-3,
            b1=0.9,
            b2=0.5,
            seed=3,
            state_dtype=jnp.bfloat16,
            rounding="stochastic",
        ),
    ),
}
NAMES = list(OPTIMIZERS)


def make(name):
    factory, kw = OPTIMIZERS[name]
    return factory(**kw)


def params_and_grads(dtype=jnp.float32, steps=12, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"conv": (3, 3, 8, 16), "dense": (64, 16)}
    params = {
        k: jnp.asarray(np.where(rng.random(s) < 0.5, -1.0, 1.0), dtype) for k, s in shapes.items()
    }
    drift = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads = [
        {k: jnp.asarray(1e-2 * (drift[k] + rng.normal(size=s)), dtype) for k, s in shapes.items()}
        for _ in range(steps)
    ]
    return params, grads


def run(tx, params, grads):
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state, u

    history = []
    for g in grads:
        params, state, u = step(params, state, g)
        history.append(params)
    return history, state


def total_flips(history, params0):
    prev, n = params0, 0
    for p in history:
        n += sum(
            int(jnp.sum(a != b))
            for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(prev), strict=True)
        )
        prev = p
    return n


@functools.cache
def scanned(name, steps=4):
    """The weights after each step, from one jitted `jax.lax.scan` over the steps."""
    params, grads = params_and_grads(steps=steps)
    tx = make(name)

    def body(carry, g):
        u, state = tx.update(g, carry[1], carry[0])
        new = optax.apply_updates(carry[0], u)
        return (new, state), new

    grads = jax.tree.map(lambda *g: jnp.stack(g), *grads)
    return jax.jit(jax.lax.scan, static_argnums=0)(body, (params, tx.init(params)), grads)[1]


class JitTest(chex.TestCase):
    """``update`` with and without jit gives the flips of one jitted scan over the steps."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*NAMES)
    def test_update_matches_a_jitted_scan(self, name):
        params, grads = params_and_grads(steps=4)
        tx = make(name)
        update, state = self.variant(tx.update), tx.init(params)
        want = [jax.tree.map(lambda x, t=t: x[t], scanned(name)) for t in range(len(grads))]
        for g, w in zip(grads, want, strict=True):
            u, state = update(g, state, params)
            params = optax.apply_updates(params, u)
            chex.assert_trees_all_equal(params, w)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_gives_the_same_flips(name):
    factory, kw = OPTIMIZERS[name]
    params, grads = params_and_grads()
    plain, _ = run(factory(**kw), params, grads)
    inject = optax.inject_hyperparams(factory, static_args=("state_dtype",))
    injected, state = run(inject(**kw), params, grads)
    assert total_flips(plain, params) > 0
    chex.assert_trees_all_equal(plain, injected)
    numeric = {k for k, v in kw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert set(state.hyperparams) >= numeric


def test_inject_hyperparams_value_can_be_changed_between_steps():
    params, grads = params_and_grads()
    tx = optax.inject_hyperparams(binax.bop)(threshold=1e-6, gamma=1e-2)
    state = tx.init(params)
    state.hyperparams["threshold"] = jnp.asarray(1e9)  # nothing can beat this threshold
    for g in grads:
        u, state = tx.update(g, state, params)
        assert all(not jnp.any(x) for x in jax.tree.leaves(u))


def test_inject_hyperparams_with_schedule():
    params, grads = params_and_grads()
    sched = optax.linear_schedule(1e-2, 1e-3, 10)
    plain, _ = run(binax.bop(threshold=1e-6, gamma=sched), params, grads)
    injected, _ = run(
        optax.inject_hyperparams(binax.bop)(threshold=1e-6, gamma=sched), params, grads
    )
    chex.assert_trees_all_equal(plain, injected)


DEFAULTS = {f.__name__: f for f in (binax.bop, binax.bop2nd_order, binax.sgdat, binax.diode)}


@pytest.mark.parametrize("name", NAMES + [f"{n}_defaults" for n in DEFAULTS])
def test_inject_hyperparams_keeps_the_state_structure(name):
    """Injected numbers become arrays; no argument may change the state's structure by that
    (so checkpoints swap between the two, and no buffer is kept for a momentum of 0)."""
    if name.endswith("_defaults"):
        factory, kw = DEFAULTS[name.removesuffix("_defaults")], {}
    else:
        factory, kw = OPTIMIZERS[name]
    params, _ = params_and_grads(steps=0)
    injected = optax.inject_hyperparams(factory, static_args=("state_dtype",))(**kw)
    want = factory(**kw).init(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(injected.init(params).inner_state, want)
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.jit(injected.init)(params).inner_state, want)


@pytest.mark.parametrize("name", NAMES)
def test_init_on_abstract_params(name):
    """As Optax's sharding tests do: ``init`` on `jax.ShapeDtypeStruct` params gives the state's
    shapes and dtypes (leaves whose value depends on the weights' signs come out abstract)."""
    params, _ = params_and_grads(steps=0)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx = make(name)
    chex.assert_trees_all_equal_shapes_and_dtypes(tx.init(abstract), tx.init(params))
    chex.assert_trees_all_equal_shapes_and_dtypes(
        tx.init(abstract), jax.eval_shape(tx.init, params)
    )


@pytest.mark.parametrize("name", ["bop", "sgdat", "diode"])
def test_multi_steps_accumulates_then_applies_mean_gradient(name):
    """Nothing moves for 3 steps; the 4th applies the optimizer to the mean of the 4 gradients,
    and flips weights (so an optimizer that does nothing fails)."""
    params, grads = params_and_grads(steps=8)
    tx = optax.MultiSteps(make(name), every_k_schedule=4)
    state = tx.init(params)
    ref_tx = make(name)
    ref_state = ref_tx.init(params)
    ref_params = params
    update = jax.jit(tx.update)
    for k in range(2):
        chunk = grads[4 * k : 4 * k + 4]
        for i, g in enumerate(chunk):
            u, state = update(g, state, params)
            if i < 3:
                assert all(not jnp.any(x) for x in jax.tree.leaves(u)), "no update before k=4"
        flips = sum(int(jnp.sum(x != 0)) for x in jax.tree.leaves(u))
        assert flips > 0, f"the 4th step of chunk {k} flipped nothing"
        params = optax.apply_updates(params, u)
        mean = jax.tree.map(lambda *gs: sum(gs) / 4, *chunk)
        ru, ref_state = ref_tx.update(mean, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, ru)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b), params, ref_params)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_updates_keep_param_dtype_and_weights_stay_binary(name, dtype):
    params, grads = params_and_grads(dtype=dtype)
    history, _ = run(make(name), params, grads)
    for p in history:
        for x in jax.tree.leaves(p):
            assert x.dtype == dtype
            assert set(np.unique(np.asarray(x, np.float32))) <= {-1.0, 1.0}


@pytest.mark.parametrize("name", ["bop", "bop2nd_order", "sgdat", "diode", "cema"])
def test_bfloat16_state(name):
    factory, kw = OPTIMIZERS[name]
    params, grads = params_and_grads()
    tx = factory(**kw, state_dtype=jnp.bfloat16)
    history, state = run(tx, params, grads)
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.bfloat16 for x in floats)
    for p in history:
        assert all(set(np.unique(np.asarray(x))) <= {-1.0, 1.0} for x in jax.tree.leaves(p))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_state_shape_dtype_stable_across_steps_and_cond(name, dtype):
    params, grads = params_and_grads(dtype=dtype, steps=2)
    tx = make(name)
    state0 = tx.init(params)

    @jax.jit
    def maybe_step(pred, state):
        return jax.lax.cond(pred, lambda s: tx.update(grads[0], s, params)[1], lambda s: s, state)

    state1 = maybe_step(True, state0)
    state2 = maybe_step(False, state1)
    for s in (state1, state2):
        assert jax.tree.structure(s) == jax.tree.structure(state0)
        for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(state0), strict=True):
            assert a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("axis_type", ["Auto", "Explicit"])
@pytest.mark.parametrize("name", NAMES)
def test_eight_devices_sharded_params_give_the_same_flips(name, axis_type):
    devices = jax.devices()
    assert len(devices) == 8, "conftest.py simulates 8 CPU devices"
    kind = getattr(jax.sharding.AxisType, axis_type)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(kind, kind))
    with jax.set_mesh(mesh):
        check_sharded_run(name, mesh)


def check_sharded_run(name, mesh):
    spec = {"conv": P(None, None, "data", "model"), "dense": P("data", "model")}
    shardings = {k: NamedSharding(mesh, s) for k, s in spec.items()}
    params, grads = params_and_grads()
    single, _ = run(make(name), params, grads)

    tx = make(name)
    sparams = jax.device_put(params, shardings)
    state = jax.jit(tx.init)(sparams)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p), out_shardings=(shardings, None))
    for g, want in zip(grads, single, strict=True):
        g = jax.device_put(g, shardings)
        u, state = step(sparams, state, g)
        sparams = optax.apply_updates(sparams, u)
        chex.assert_trees_all_equal(sparams, want)
    assert total_flips(single, params) > 0
    # Every per-weight state leaf carries the sharding of the parameter it belongs to.
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if leaf.ndim:
            key = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
            assert leaf.sharding.is_equivalent_to(shardings[key], leaf.ndim), (path, leaf.sharding)
    for k, x in sparams.items():
        assert x.sharding.is_equivalent_to(shardings[k], x.ndim)
    # init on abstract params (shapes, dtypes, shardings): the state's shardings too
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), sparams
    )
    for a, b in zip(jax.tree.leaves(tx.init(abstract)), jax.tree.leaves(state), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        if a.ndim:
            assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (a.sharding, b.sharding)
