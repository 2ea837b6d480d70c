"""Quantizers: exact forward values and surrogate gradients (reverse and forward mode)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from binax import quantizers as q

# Boundaries included: 0, +-1 (the default clip), +-0.5, +-1.3 and values far outside.
X = np.array(
    [-3.0, -1.3, -1.0, -0.999, -0.5, -1e-7, 0.0, 1e-7, 0.5, 0.999, 1.0, 1.3, 3.0], np.float32
)


def sign0_np(x):
    return np.where(x >= 0, 1.0, -1.0).astype(x.dtype)


def grads(f, x):
    """(reverse-mode, forward-mode) elementwise derivative of ``f`` at ``x``."""

    @jax.jit
    def both(x):
        rev = jax.grad(lambda v: jnp.sum(f(v)))(x)
        _, fwd = jax.jvp(f, (x,), (jnp.ones_like(x),))
        return rev, fwd

    rev, fwd = both(x)
    return np.asarray(rev), np.asarray(fwd)


def swish_slope_np(x, beta):
    x = x.astype(np.float64)
    return beta * (2 - beta * x * np.tanh(beta * x / 2)) / (1 + np.cosh(beta * x))


CASES = [
    ("ste_sign", q.ste_sign, sign0_np, lambda x: (np.abs(x) <= 1.0).astype(np.float32)),
    (
        "ste_sign clip 1.3",
        functools.partial(q.ste_sign, clip_value=1.3),
        sign0_np,
        lambda x: (np.abs(x) <= np.float32(1.3)).astype(np.float32),
    ),
    (
        "ste_sign clip 0.5",
        functools.partial(q.ste_sign, clip_value=0.5),
        sign0_np,
        lambda x: (np.abs(x) <= 0.5).astype(np.float32),
    ),
    (
        "ste_sign clip None",
        functools.partial(q.ste_sign, clip_value=None),
        sign0_np,
        np.ones_like,
    ),
    (
        "approx_sign",
        q.approx_sign,
        sign0_np,
        lambda x: np.where(np.abs(x) <= 1, 2 - 2 * np.abs(x), 0.0),
    ),
    ("swish_sign", q.swish_sign, sign0_np, lambda x: swish_slope_np(x, 5.0)),
    (
        "swish_sign beta 2",
        functools.partial(q.swish_sign, beta=2.0),
        sign0_np,
        lambda x: swish_slope_np(x, 2.0),
    ),
    (
        "ste_heaviside",
        q.ste_heaviside,
        lambda x: (x > 0).astype(x.dtype),
        lambda x: (np.abs(x) <= 1.0).astype(np.float32),
    ),
]


@pytest.mark.parametrize("name,fn,forward,slope", CASES, ids=[c[0] for c in CASES])
def test_forward_and_gradients(name, fn, forward, slope):
    x = jnp.asarray(X)
    y = fn(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_array_equal(np.asarray(y), forward(X))
    rev, fwd = grads(fn, x)
    np.testing.assert_allclose(rev, slope(X), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fwd, slope(X), rtol=1e-5, atol=1e-7)


def test_sign0_maps_zero_to_plus_one():
    x = jnp.array([-0.0, 0.0, -1e-30, 1e-30])
    np.testing.assert_array_equal(q.sign0(x), [1.0, 1.0, -1.0, 1.0])
    np.testing.assert_array_equal(q.ste_sign(x), [1.0, 1.0, -1.0, 1.0])


def test_boundaries_exactly_inclusive():
    # The gradient passes at |x| == clip_value exactly (Larq: abs(x) <= clip_value).
    for clip in (1.0, 0.25, 2.0):
        x = jnp.array([-clip, clip, np.nextafter(np.float32(clip), np.float32(9))])
        rev, fwd = grads(functools.partial(q.ste_sign, clip_value=clip), x)
        np.testing.assert_array_equal(rev, [1.0, 1.0, 0.0])
        np.testing.assert_array_equal(fwd, [1.0, 1.0, 0.0])


def test_magnitude_aware_sign():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 4, 5)) * 0.5, jnp.float32)
    y = q.magnitude_aware_sign(w)
    scale = np.mean(np.abs(np.asarray(w)), axis=(0, 1, 2))
    np.testing.assert_allclose(y, scale * sign0_np(np.asarray(w)), rtol=1e-6)
    # The scale is not differentiated: gradient = scale * 1{|w| <= 1}.
    want = np.broadcast_to(scale, w.shape) * (np.abs(np.asarray(w)) <= 1)
    rev, fwd = grads(q.magnitude_aware_sign, w)
    np.testing.assert_allclose(rev, want, rtol=1e-6)
    np.testing.assert_allclose(fwd, want, rtol=1e-6)


def test_gradient_scales_incoming_cotangent():
    x = jnp.asarray(X)
    ct = jnp.linspace(-2.0, 2.0, X.size)
    for fn, slope in ((q.ste_sign, np.abs(X) <= 1), (q.approx_sign, None)):
        _, vjp = jax.vjp(fn, x)
        (g,) = vjp(ct)
        if slope is None:
            slope = np.where(np.abs(X) <= 1, 2 - 2 * np.abs(X), 0.0)
        np.testing.assert_allclose(g, np.asarray(ct) * slope, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", q.names())
def test_jit_vmap_bfloat16(name):
    fn = q.get(name)
    x = jnp.asarray(X).astype(jnp.bfloat16)
    y = jax.jit(jax.vmap(fn))(x[:, None])[:, 0]
    assert y.dtype == jnp.bfloat16
    if name != "magnitude_aware_sign":  # that one multiplies by mean |x|
        assert set(np.unique(np.asarray(y, np.float32))) <= {-1.0, 0.0, 1.0}
    g = jax.jit(jax.grad(lambda v: jnp.sum(fn(v).astype(jnp.float32))))(x)
    assert g.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


def test_swish_sign_far_tails_are_finite():
    x = jnp.array([-1e4, -100.0, 100.0, 1e4])
    rev, fwd = grads(q.swish_sign, x)
    assert np.all(np.isfinite(rev)) and np.all(np.isfinite(fwd))
    np.testing.assert_allclose(rev, 0.0, atol=1e-30)


def test_second_order_works():
    # The surrogate of ste_sign is piecewise linear: its second derivative is zero.
    h = jax.jit(jax.hessian(lambda v: jnp.sum(q.ste_sign(v))))(jnp.asarray(X))
    np.testing.assert_array_equal(h, 0.0)
    # approx_sign's surrogate 2x + x|x| has second derivative -2 sign(x) inside (0, 1).
    x = jnp.array([-0.5, 0.25, 0.75, 2.0])
    d2 = jax.grad(jax.grad(lambda v: q.approx_sign(v)))
    np.testing.assert_allclose(jax.jit(jax.vmap(d2))(x), [2.0, -2.0, -2.0, 0.0])


def test_get_resolves_names_callables_none():
    for name in q.names():
        assert callable(q.get(name))
    assert q.get("ste_sign") is q.ste_sign
    assert q.get(None) is None
    f = functools.partial(q.ste_sign, clip_value=2.0)
    assert q.get(f) is f
    with pytest.raises(ValueError, match="unknown quantizer 'sgn'.*ste_sign"):
        q.get("sgn")
    with pytest.raises(ValueError, match="kernel_quantizer"):
        q.get(3, argname="kernel_quantizer")


def test_precision():
    assert q.precision("ste_sign") == 1
    assert q.precision(q.approx_sign) == 1
    assert q.precision(functools.partial(q.swish_sign, beta=2.0)) == 1
    assert q.precision(None) == 32
    assert q.precision(jnp.tanh) is None

    def custom(x):
        return jnp.sign(x)

    custom.precision = 1
    assert q.precision(custom) == 1


# --- elastic binarization (BiT) ---------------------------------------------------------------

# u = (x - threshold) / scale on a grid with the range bounds -1, 0, 1 and the rounding point 1/2
# exactly representable: scale 0.5, thresholds 0 and 0.25 per feature.
U = np.array([-2.0, -1.0, -0.75, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5], np.float32)
SCALE = np.float32(0.5)
THRESHOLD = np.array([0.0, 0.25], np.float32)
XE = (THRESHOLD + SCALE * U[:, None]).astype(np.float32)  # (10, 2)


def elastic_np(x, scale, threshold, signed):
    """(forward, d/dx, d/dscale, d/dthreshold) of BiT's elastic binarization, elementwise."""
    u = (x - threshold) / scale
    lo = -1.0 if signed else 0.0
    inside = (u >= lo) & (u <= 1.0)
    codes = np.where(u >= 0, 1.0, -1.0) if signed else np.where(u > 0.5, 1.0, 0.0)
    d_scale = np.where(inside, codes - u, codes)  # Q_n / Q_p outside the range
    return scale * codes, inside * 1.0, d_scale, -1.0 * inside


@pytest.mark.parametrize("signed", [True, False])
def test_elastic_binarize_forward_and_gradients(signed):
    rng = np.random.default_rng(1)
    ct = rng.normal(size=XE.shape).astype(np.float32)  # a cotangent, so sums are weighted
    want_y, want_dx, want_ds, want_dt = elastic_np(XE, SCALE, THRESHOLD, signed)

    f = lambda x, s, t: q.elastic_binarize(x, s, t, signed=signed)
    args = (jnp.asarray(XE), jnp.asarray(SCALE), jnp.asarray(THRESHOLD))
    y = jax.jit(f)(*args)
    np.testing.assert_array_equal(y, want_y)
    codes = q.elastic_sign(*args, signed=signed)
    np.testing.assert_array_equal(codes, want_y / SCALE)
    assert set(np.unique(codes)) == ({-1.0, 1.0} if signed else {0.0, 1.0})

    # Reverse mode: the broadcast scale (scalar) and threshold (per feature) sum their gradients.
    gx, gs, gt = jax.jit(jax.grad(lambda *a: jnp.sum(ct * f(*a)), argnums=(0, 1, 2)))(*args)
    np.testing.assert_allclose(gx, ct * want_dx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gs, np.sum(ct * want_ds), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gt, np.sum(ct * want_dt, axis=0), rtol=1e-6, atol=1e-7)

    # Forward mode, one direction per argument.
    ones = [jnp.ones_like(a) for a in args]
    zeros = [jnp.zeros_like(a) for a in args]
    for i, want in enumerate((want_dx, want_ds, want_dt)):
        tangents = tuple(ones[j] if j == i else zeros[j] for j in range(3))
        _, jvp = jax.jit(lambda a, t: jax.jvp(f, a, t))(args, tangents)
        np.testing.assert_allclose(jvp, want, rtol=1e-5, atol=1e-6)


def test_elastic_binarize_matches_round_clip_definition():
    # Away from the rounding point, the unsigned forward is scale * round(clip(u, 0, 1)) and the
    # signed one scale * sign(u); random inputs, a per-feature threshold.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    s, t = np.float32(0.7), rng.normal(size=3).astype(np.float32)
    u = (x - t) / s
    np.testing.assert_allclose(
        q.elastic_binarize(x, s, t, signed=False), s * np.round(np.clip(u, 0, 1)), rtol=1e-6
    )
    np.testing.assert_allclose(q.elastic_binarize(x, s, t), s * np.where(u >= 0, 1, -1))


def test_elastic_binarize_errors_and_precision():
    with pytest.raises(ValueError, match=r"threshold \(shape \(3,\)\).*\(4, 2\)"):
        q.elastic_binarize(jnp.ones((4, 2)), 1.0, jnp.zeros(3))
    assert q.precision(functools.partial(q.elastic_sign, scale=1.0)) == 1
    assert q.precision(q.elastic_binarize) == 1
