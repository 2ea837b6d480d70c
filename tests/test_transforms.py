"""Building blocks: composition, invariants (hypothesis), non-finite gradients, bad input."""

import functools
import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import binax
from binax import transforms as T

F = np.float32

ALL = {
    "bop": lambda: binax.bop(threshold=1e-6, gamma=0.5),
    "bop2nd_order": lambda: binax.bop2nd_order(threshold=0.1, gamma=0.5, sigma=0.5),
    "bop2nd_order_rate": lambda: binax.bop2nd_order(
        threshold=0.5, gamma=0.5, sigma=0.5, bias_correction="rate"
    ),
    "sgdat": lambda: binax.sgdat(
        learning_rate=0.5, threshold=1e-3, momentum=0.9, nesterov=True, weight_decay=0.1
    ),
    "diode": lambda: binax.diode(learning_rate=1e-2, b1=0.5, b2=0.5),
    "cema": lambda: binax.cema(gamma=0.5, alpha=0.5),
}


# ---- invariants -------------------------------------------------------------------------------

STEPS, N = 6, 16


@functools.cache
def compiled_run(name, dtype):
    tx = ALL[name]()

    @jax.jit
    def run(w, grads):
        state = tx.init(w)

        def body(carry, g):
            w, state = carry
            u, state = tx.update(g, state, w)
            return (optax.apply_updates(w, u), state), (u, optax.apply_updates(w, u))

        (_, state), (us, ws) = jax.lax.scan(body, (w, state), grads)
        return us, ws, state

    return run


finite_or_not = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38]),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(ALL)),
    dtype=st.sampled_from(["float32", "bfloat16"]),
    signs=hnp.arrays(np.bool_, (N,)),
    grads=hnp.arrays(np.float32, (STEPS, N), elements=finite_or_not),
)
def test_weights_stay_exactly_binary_for_any_gradients(name, dtype, signs, grads):
    dt = jnp.dtype(dtype)
    w = jnp.where(jnp.asarray(signs), 1.0, -1.0).astype(dt)
    us, ws, state = compiled_run(name, dtype)(w, jnp.asarray(grads).astype(dt))
    assert us.dtype == dt and ws.dtype == dt
    assert set(np.unique(np.asarray(ws, np.float32))) <= {-1.0, 1.0}
    assert set(np.unique(np.asarray(us, np.float32))) <= {-2.0, 0.0, 2.0}
    for leaf in jax.tree.leaves(state):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32))), "state was poisoned"


@settings(max_examples=25, deadline=None)
@given(
    w=hnp.arrays(np.float32, (N,), elements=st.floats(-1, 1, width=32)),
    g=hnp.arrays(np.float32, (N,), elements=st.floats(-1e3, 1e3, width=32)),
    lr=st.floats(1e-3, 10.0),
)
def test_clip_latent_keeps_weights_in_the_box(w, g, lr):
    tx = optax.chain(optax.sgd(lr), binax.clip_latent(1.0))
    u, _ = tx.update(jnp.asarray(g), tx.init(jnp.asarray(w)), jnp.asarray(w))
    new = np.asarray(optax.apply_updates(jnp.asarray(w), u))
    assert np.all(np.abs(new) <= 1.0)
    inside = np.abs(w - lr * g) < 0.999
    np.testing.assert_allclose(new[inside], (w - F(lr) * g)[inside], rtol=1e-5, atol=1e-6)


# ---- non-finite gradients ---------------------------------------------------------------------


def test_non_finite_gradient_elements_are_skipped():
    """A NaN/inf gradient element leaves that element's state as it was (as if skipped)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(np.where(rng.random(32) < 0.5, -1.0, 1.0), jnp.float32)
    grads = rng.normal(size=(50, 32)).astype(F) * 1e-2
    bad = grads.copy()
    bad[10, :4] = np.nan
    bad[20, 4:8] = np.inf
    bad[30, 8:12] = -np.inf
    tx = binax.bop(threshold=1e-4, gamma=0.1)
    # Reference: the same run where those elements simply do not update their momentum.
    m, wr = np.zeros(32, F), np.asarray(w)
    state, wb = tx.init(w), w
    flips = 0
    for g_ok, g_bad in zip(grads, bad, strict=True):
        fin = np.isfinite(g_bad)
        m = np.where(fin, m + F(0.1) * (g_ok - m), m)
        new = np.where(wr * m > F(1e-4), -wr, wr)
        flips += int(np.sum(new != wr))
        wr = new
        u, state = tx.update(jnp.asarray(g_bad), state, wb)
        wb = optax.apply_updates(wb, u)
        np.testing.assert_array_equal(np.asarray(wb), wr)
    assert flips > 10


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_keep_finite_is_where_isfinite_also_in_place(dtype):
    """The guard's spelling (a sum of two selects, see `_keep_finite`) computes
    ``where(isfinite(new), new, old)``, also jitted with ``old`` donated (updated in place)."""
    new = jnp.array([1.5, -2.0, jnp.nan, jnp.inf, -jnp.inf, -0.0, 0.0, jnp.nan, 3.0], dtype)
    old = jnp.array([7.0, 7.0, 0.25, -0.5, 8.0, 7.0, 7.0, -0.0, -0.0], dtype)
    want = np.where(np.isfinite(np.asarray(new, F)), np.asarray(new, F), np.asarray(old, F))
    in_place = jax.jit(lambda o, n: T._keep_finite(n, o), donate_argnums=0)
    for got in (T._keep_finite(new, old), in_place(jnp.array(old), new)):
        assert got.dtype == dtype
        np.testing.assert_array_equal(np.asarray(got, F), want)  # -0.0 may come out as +0.0


def test_guard_spelling_changes_no_value_in_a_donated_jitted_step(monkeypatch):
    """In the training path (jit, state donated) the shipped guard gives the same weights and
    state as the plain ``jnp.where`` spelling, with NaN, inf and overflowing gradients."""
    rng = np.random.default_rng(1)
    w = jnp.asarray(np.where(rng.random(64) < 0.5, -1.0, 1.0), jnp.float32)
    grads = rng.normal(size=(30, 64)).astype(F) * 1e-2
    grads[5, :8], grads[9, 8:16], grads[12, 16:20] = np.nan, np.inf, 1e30  # 1e30**2 overflows

    def run():
        tx = binax.bop2nd_order(threshold=1e-3, gamma=0.1, sigma=0.1)

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def step(params, state, g):
            u, state = tx.update(g, state, params)
            return optax.apply_updates(params, u), state

        params, state, out = jnp.array(w), tx.init(w), []
        for g in grads:
            params, state = step(params, state, jnp.asarray(g))
            out.append([np.asarray(params)] + [np.asarray(x) for x in jax.tree.leaves(state)])
        return out

    shipped = run()
    monkeypatch.setattr(T, "_keep_finite", lambda new, old: jnp.where(jnp.isfinite(new), new, old))
    plain = run()
    for a, b in zip(shipped, plain, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
            assert np.all(np.isfinite(x))
    assert np.sum(shipped[-1][0] != np.asarray(w)) > 0  # some weights flipped


def test_nan_signal_keeps_the_weight_in_every_flip_rule():
    w = jnp.array([1.0, -1.0])
    s = jnp.array([jnp.nan, jnp.nan])
    for rule in (
        T.flip_by_threshold(0.0),
        T.flip_to_descent_sign(),
        T.flip_by_adaptive_threshold(0.0),
    ):
        u, _ = rule.update(s, rule.init(w), w)
        np.testing.assert_array_equal(u, [0.0, 0.0])


@pytest.mark.parametrize("state_dtype,g", [(jnp.float32, 3e38), (jnp.float16, 1e3)])
def test_overflowing_second_moment_does_not_poison_state(state_dtype, g):
    """g*g overflows float32; in float16 storage, rounding the float32 moment overflows."""
    w = jnp.array([1.0, -1.0])
    tx = binax.bop2nd_order(threshold=0.1, gamma=0.5, sigma=0.5, state_dtype=state_dtype)
    state = tx.init(w)
    u, state = tx.update(jnp.array([g, -g], jnp.float32), state, w)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
    want_mu = np.array([g / 2, -g / 2], F).astype(state_dtype).astype(F)
    np.testing.assert_array_equal(np.asarray(state[0].mu, F), want_mu)  # mu did update
    np.testing.assert_array_equal(np.asarray(state[0].nu, F), [0.0, 0.0])  # nu kept its old


@pytest.mark.parametrize("bias_correction", ["rate", "adam"])
def test_bias_correction_divisions_stay_true_divisions_in_the_compiled_hlo(bias_correction):
    """XLA rewrites ``x / rate`` into ``x * (1 / rate)`` and ``(m / a) / b`` into ``m / (a * b)``
    unless kept from it: the compiled update must divide elementwise three times (m by its
    scale, v by its scale, and the ratio) and never compute a scalar reciprocal."""
    tx = T.scale_by_moment_ratio(1e-2, 1e-2, bias_correction=bias_correction)
    g = jnp.ones(64)
    hlo = jax.jit(tx.update).lower(g, tx.init(g)).compile().as_text()
    divides = re.findall(r"= (\w+\[[\d,]*\])\S* divide\(", hlo)
    assert divides == ["f32[64]"] * 3, [line for line in hlo.splitlines() if "divide(" in line]


# ---- composing new optimizers from the blocks -------------------------------------------------


def test_cema_is_two_emas_and_a_zero_threshold_flip():
    w = jnp.asarray(np.where(np.arange(20) % 3 == 0, -1.0, 1.0), jnp.float32)
    grads = np.random.default_rng(1).normal(size=(30, 20)).astype(F)
    a = binax.cema(gamma=0.3, alpha=0.4)
    b = optax.chain(T.scale_by_ema(0.3), T.scale_by_ema(0.4), T.flip_by_threshold(0.0))
    sa, sb = a.init(w), b.init(w)
    for g in grads:
        ua, sa = a.update(jnp.asarray(g), sa, w)
        ub, sb = b.update(jnp.asarray(g), sb, w)
        np.testing.assert_array_equal(ua, ub)


def test_signal_sign_convention():
    """Positive signal means 'decrease': a +1 weight with positive momentum flips."""
    w = jnp.array([1.0, 1.0, -1.0, -1.0])
    s = jnp.array([1.0, -1.0, 1.0, -1.0])
    u, _ = T.flip_by_threshold(0.5).update(s, T.flip_by_threshold(0.5).init(w), w)
    np.testing.assert_array_equal(w + u, [-1.0, 1.0, -1.0, 1.0])
    u, _ = T.flip_to_descent_sign().update(s, T.flip_to_descent_sign().init(w), w)
    np.testing.assert_array_equal(w + u, [-1.0, 1.0, -1.0, 1.0])


def test_adaptive_threshold_grows_with_flips_and_counts_saturate():
    w = jnp.array([1.0])
    tx = T.flip_by_adaptive_threshold(1.0, count_dtype=jnp.int8)
    state = tx.init(w)
    state = state._replace(packed=jnp.array([4 * 30], jnp.int8))  # 30 flips, weight +1
    u, state = tx.update(jnp.array([30.5]), state, w)  # 30.5 > 1 * 30: moves to -1
    assert float((w + u)[0]) == -1.0 and int(state.flips[0]) == 31
    w = w + u
    u, state = tx.update(jnp.array([-200.0]), state, w)  # 200 > 31: moves, count saturates
    assert float((w + u)[0]) == 1.0 and int(state.flips[0]) == 31
    w = w + u
    u, state = tx.update(jnp.array([20.0]), state, w)  # 20 < 31: holds
    assert float(u[0]) == 0.0
    assert int(state.packed[0]) == 4 * 31  # count 31, not moved, sign +1


def test_flip_count_reset_every():
    w = jnp.array([1.0])
    tx = T.flip_by_adaptive_threshold(1.0, reset_every=2)
    state = tx.init(w)
    u, state = tx.update(jnp.array([0.5]), state, w)  # step 0: threshold 0 -> flip, n = 1
    w = w + u
    assert int(state.flips[0]) == 1
    u, state = tx.update(jnp.array([-0.5]), state, w)  # step 1: 0.5 < 1*1 -> hold
    assert float(u[0]) == 0.0
    u, state = tx.update(jnp.array([-0.5]), state, w)  # step 2: reset, threshold 0 -> flip
    assert float(u[0]) == 2.0 and int(state.flips[0]) == 1


# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL))
def test_update_without_params_is_an_error(name):
    tx = ALL[name]()
    w = {"k": jnp.ones(3)}
    with pytest.raises(ValueError, match="params"):
        tx.update({"k": jnp.ones(3)}, tx.init(w))


@pytest.mark.parametrize("name", sorted(ALL))
def test_mismatched_trees_are_an_error(name):
    tx = ALL[name]()
    w = {"k": jnp.ones(3)}
    state = tx.init(w)
    with pytest.raises(ValueError, match="shapes differ|do not match"):
        tx.update({"k": jnp.ones(4)}, state, w)
    with pytest.raises(ValueError, match="do not match"):
        T.flip_by_threshold(0.0).update({"a": jnp.ones(3)}, None, {"b": jnp.ones(3)})


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_])
def test_integer_or_boolean_params_are_an_error(name, dtype):
    w = {"kernel": jnp.ones(3, dtype)}
    tx = ALL[name]()
    with pytest.raises(TypeError, match="kernel has dtype .*floating"):
        tx.update({"kernel": jnp.ones(3)}, tx.init({"kernel": jnp.ones(3)}), w)
    with pytest.raises(TypeError, match="kernel has dtype .*floating"):  # init needs signs
        tx.update({"kernel": jnp.ones(3)}, tx.init(w), w)


@pytest.mark.parametrize(
    "build,arg",
    [
        (lambda: binax.bop(threshold=-1e-8), "threshold"),
        (lambda: binax.bop(gamma=0.0), "gamma"),
        (lambda: binax.bop(gamma=1.5), "gamma"),
        (lambda: binax.bop(gamma=float("nan")), "gamma"),
        (lambda: binax.bop2nd_order(sigma=2.0), "sigma"),
        (lambda: binax.bop2nd_order(bias_correction="unbiased"), "bias_correction"),
        (lambda: binax.bop2nd_order(eps=-1.0), "eps"),
        (lambda: binax.sgdat(momentum=-0.9), "momentum"),
        (lambda: binax.sgdat(learning_rate=-1e-4), "learning_rate"),
        (lambda: binax.sgdat(threshold=-1.0), "threshold"),
        (lambda: binax.sgdat(dampening=1.5), "dampening"),
        (lambda: binax.sgdat(weight_decay=-1.0), "weight_decay"),
        (lambda: binax.sgdat(flip_count_reset_every=0), "flip_count_reset_every"),
        (lambda: binax.diode(b1=1.0), "b1"),
        (lambda: binax.diode(b2=-0.1), "b2"),
        (lambda: binax.diode(learning_rate=0.0), "learning_rate"),
        (lambda: binax.diode(init_scale=-1.0), "init_scale"),
        (lambda: binax.cema(gamma=0.1, alpha=0.0), "alpha"),
        (lambda: binax.clip_latent(limit=0.0), "limit"),
        (lambda: binax.bop(state_dtype=jnp.int32), "state_dtype"),
        (lambda: binax.bop(state_dtype="float33"), "state_dtype"),
        (lambda: binax.bop(state_dtype=jnp.zeros((), jnp.bfloat16)), "static_args"),
        (lambda: binax.sgdat(count_dtype=jnp.zeros((), jnp.int8)), "count_dtype"),
        (lambda: binax.bop(rounding="up"), "rounding"),
        (lambda: binax.bop(rounding="stochastic"), "rounding"),  # needs bfloat16 state
        (
            lambda: binax.cema(1e-3, 1e-2, state_dtype=jnp.float16, rounding="stochastic"),
            "bfloat16",
        ),
        (lambda: binax.sgdat(count_dtype=jnp.float32), "count_dtype"),
        (lambda: binax.bop(gamma="fast"), "gamma"),
    ],
)
def test_hyperparameters_out_of_range_name_the_argument(build, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        build()


def test_out_of_range_injected_hyperparameter_is_caught_at_init():
    tx = optax.inject_hyperparams(binax.bop)(threshold=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        tx.init({"k": jnp.ones(3)})
