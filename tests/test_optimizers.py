"""Each optimizer against an independent NumPy implementation of its rule (docs/optimizers.md).

The references below are written from the spec, in float32 NumPy, without calling binax. Each
test runs at least 200 steps of random gradients with hyperparameters chosen so that flips do
happen (asserted), and requires the weights after every step to agree exactly.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import binax

F = np.float32
STEPS = 240
SHAPES = {"a": (37, 11), "b": (64,)}


def sign0(x):
    return np.where(x >= 0, F(1), F(-1))


def random_grads(seed, steps=STEPS, scale=1e-3, persistence=0.5):
    """Gradients with a per-weight drift plus noise, so weights keep wanting to move."""
    rng = np.random.default_rng(seed)
    drift = {k: rng.normal(size=s).astype(F) for k, s in SHAPES.items()}
    out = []
    for _ in range(steps):
        out.append(
            {
                k: (scale * (persistence * drift[k] + rng.normal(size=s))).astype(F)
                for k, s in SHAPES.items()
            }
        )
        if rng.random() < 0.05:  # drifts change now and then, so weights flip back too
            k = rng.choice(list(SHAPES))
            drift[k] = rng.normal(size=SHAPES[k]).astype(F)
    return out


def random_binary(seed):
    rng = np.random.default_rng(seed)
    return {k: np.where(rng.random(s) < 0.5, F(-1), F(1)) for k, s in SHAPES.items()}


def run_binax(tx, params, grads):
    """The weights after every step, as NumPy."""
    params = jax.tree.map(jnp.asarray, params)
    state = tx.init(params)

    @jax.jit
    def step(params, state, g):
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    out = []
    for g in grads:
        params, state = step(params, state, g)
        out.append(jax.tree.map(np.asarray, params))
    return out, state


def assert_same_flips(ours, ref, w0, min_flips=50):
    flips = 0
    prev = w0
    for t, (a, b) in enumerate(zip(ours, ref, strict=True)):
        for k in SHAPES:
            bad = np.flatnonzero(a[k] != b[k])
            assert bad.size == 0, f"step {t}, leaf {k}: {bad.size} weights differ, e.g. {bad[:5]}"
            assert set(np.unique(a[k])) <= {-1.0, 1.0}
            flips += int(np.sum(a[k] != prev[k]))
        prev = a
    assert flips >= min_flips, f"only {flips} flips: the test would not show anything"
    return flips


# ---- NumPy references, written from docs/optimizers.md ------------------------------------


def keep(x, *where):
    return x


def bf16(x, *where):
    """Round float32 to bfloat16 (to nearest even) and back: a bfloat16-stored state."""
    return np.asarray(x, F).astype(ml_dtypes.bfloat16).astype(F)


def mix32(x):
    """MurmurHash3's 32-bit finalizer on uint32 arrays."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, np.uint32)
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x85EBCA6B)
        x = x ^ (x >> np.uint32(13))
        x = x * np.uint32(0xC2B2AE35)
        return x ^ (x >> np.uint32(16))


def bf16_stochastic(seed, kind):
    """Stochastic rounding to bfloat16 as binax documents it: 16 random bits, from a hash of
    (seed, kind of statistic, stream, update count t, element index), added below bfloat16's
    last bit of the float32 value, which is then truncated."""
    base = mix32(mix32(np.uint32(0x2545F491) ^ np.uint32(seed)) + np.uint32(kind))

    def store(x, stream, t):
        x = np.asarray(x, F)
        with np.errstate(over="ignore"):
            key = mix32(base ^ mix32(np.uint32(stream) * np.uint32(0x9E3779B9)))
            key = mix32(key ^ mix32(np.uint32(t) + np.uint32(0x7F4A7C15)))
            idx = np.arange(x.size, dtype=np.uint32).reshape(x.shape)
            noise = mix32(idx ^ key) & np.uint32(0xFFFF)
            up = (x.view(np.uint32) + noise) & np.uint32(0xFFFF0000)
        return up.view(F)

    return store


def bop_ref(w, grads, tau, gamma, store=keep):
    """Bop: m = ema(m, g, gamma); flip where w*m > tau. `tau`, `gamma`: functions of t.

    `store` rounds each new state to its storage dtype (identity for float32)."""
    w = dict(w)
    m = {k: np.zeros(s, F) for k, s in SHAPES.items()}
    out = []
    for t, g in enumerate(grads):
        for k in SHAPES:
            m[k] = store(m[k] + F(gamma(t)) * (g[k] - m[k]), list(SHAPES).index(k), t)
            flip = w[k] * m[k] > F(tau(t))
            w[k] = np.where(flip, sign0(-w[k]), sign0(w[k]))
        out.append(dict(w))
    return out


def bop2_ref(w, grads, tau, gamma, sigma, bias_correction, eps, store=keep):
    w = dict(w)
    m = {k: np.zeros(s, F) for k, s in SHAPES.items()}
    v = {k: np.zeros(s, F) for k, s in SHAPES.items()}
    one = F(1)
    out = []
    for t, g in enumerate(grads):
        for k in SHAPES:
            i = list(SHAPES).index(k)
            m[k] = store(m[k] + F(gamma) * (g[k] - m[k]), 2 * i, t)
            v[k] = store(v[k] + F(sigma) * (g[k] * g[k] - v[k]), 2 * i + 1, t)
            if bias_correction is None:
                s = m[k] / (np.sqrt(v[k]) + F(eps))
            elif bias_correction == "rate":
                s = (m[k] / F(gamma)) / (np.sqrt(v[k] / F(sigma)) + F(eps))
            else:
                cm = one - (one - F(gamma)) ** F(t + 1)
                cv = one - (one - F(sigma)) ** F(t + 1)
                s = (m[k] / cm) / (np.sqrt(v[k] / cv) + F(eps))
            flip = w[k] * s > F(tau)
            w[k] = np.where(flip, sign0(-w[k]), sign0(w[k]))
        out.append(dict(w))
    return out


def sgdat_ref(
    w,
    grads,
    lr,
    tau,
    momentum=0.0,
    nesterov=False,
    dampening=0.0,
    wd=0.0,
    eps=0.0,
    reset_every=None,
    store=keep,
):
    w = dict(w)
    a = {k: np.zeros(s, F) for k, s in SHAPES.items()}
    b = {k: np.zeros(s, F) for k, s in SHAPES.items()}
    n = {k: np.zeros(s, np.int64) for k, s in SHAPES.items()}
    out = []
    for t, g in enumerate(grads):
        if reset_every and t > 0 and t % reset_every == 0:  # the optimizer is rebuilt
            n = {k: np.zeros(s, np.int64) for k, s in SHAPES.items()}
            b = {k: np.zeros(s, F) for k, s in SHAPES.items()}
        for i, k in enumerate(SHAPES):
            d = g[k] + F(wd) * w[k]
            if momentum > 0:
                b[k] = store(F(momentum) * b[k] + F(1.0 - dampening) * g[k], 2 * i + 1, t)
                d = d + F(momentum) * b[k] if nesterov else b[k]
            a[k] = store(a[k] + F(lr) * d, 2 * i, t)
            move = np.abs(a[k]) > F(tau) * n[k].astype(F) + F(eps)
            w_new = np.where(move, sign0(-a[k]), w[k])
            n[k] = n[k] + (w_new != w[k])
            w[k] = w_new
        out.append(dict(w))
    return out


def diode_ref(w, grads, m2_init, lr, b1, b2):
    """Diode from a given initial m2 (the random draw of `init` is checked separately). The
    rates ``1 - b`` are computed in Python floats and rounded once, as the reference does."""
    w = dict(w)
    m1 = {k: np.zeros(s, F) for k, s in SHAPES.items()}
    m2 = {k: np.array(m2_init[k], F) for k in SHAPES}
    r1, r2 = F(1.0 - b1), F(1.0 - b2)
    out = []
    for g in grads:
        for k in SHAPES:
            m1[k] = m1[k] + r1 * (g[k] - m1[k])
            m2[k] = m2[k] + r2 * (F(lr) * np.sign(m1[k]) - m2[k])
            target = np.where(m2[k] > 0, F(-1), F(1))
            w[k] = np.where(target != sign0(w[k]), -w[k], w[k])
        out.append(dict(w))
    return out


def cema_ref(w, grads, gamma, alpha):
    w = dict(w)
    m = {k: np.zeros(s, F) for k, s in SHAPES.items()}
    i = {k: np.zeros(s, F) for k, s in SHAPES.items()}
    out = []
    for g in grads:
        for k in SHAPES:
            m[k] = m[k] + F(gamma) * (g[k] - m[k])
            i[k] = i[k] + F(alpha) * (m[k] - i[k])
            w[k] = np.where(w[k] * i[k] > 0, -w[k], w[k])
        out.append(dict(w))
    return out


# ---- flip-exact tests -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "threshold,gamma", [(1e-8, 1e-4), (1e-6, 1e-2), (0.0, 1e-3)], ids=["default", "old", "tau0"]
)
def test_bop_flip_exact(threshold, gamma):
    w0, grads = random_binary(0), random_grads(1)
    ours, _ = run_binax(binax.bop(threshold=threshold, gamma=gamma), w0, grads)
    ref = bop_ref(w0, grads, lambda t: threshold, lambda t: gamma)
    assert_same_flips(ours, ref, w0)


def test_bop_schedules_use_count_before_increment():
    # Update k uses schedule(k): the values switch exactly at step 100.
    gamma = lambda t: jnp.where(t < 100, 1e-2, 1e-3)
    tau = lambda t: jnp.where(t < 150, 1e-6, 1e-5)
    w0, grads = random_binary(2), random_grads(3)
    ours, _ = run_binax(binax.bop(threshold=tau, gamma=gamma), w0, grads)
    ref = bop_ref(
        w0, grads, lambda t: 1e-5 if t >= 150 else 1e-6, lambda t: 1e-3 if t >= 100 else 1e-2
    )
    assert_same_flips(ours, ref, w0)


def test_bop_binarizes_real_weights_on_first_update():
    rng = np.random.default_rng(4)
    w0 = {k: rng.normal(size=s).astype(F) for k, s in SHAPES.items()}
    grads = random_grads(5, steps=3)
    ours, _ = run_binax(binax.bop(threshold=1e-8, gamma=1e-2), w0, grads)
    ref = bop_ref(w0, grads, lambda t: 1e-8, lambda t: 1e-2)
    for k in SHAPES:
        # The sign is the rule's; the magnitude is 1 up to rounding of the additive update, and
        # exactly 1 where the weight kept its sign (see binax.transforms).
        np.testing.assert_array_equal(sign0(ours[0][k]), ref[0][k])
        np.testing.assert_allclose(np.abs(ours[0][k]), 1.0, rtol=0, atol=4e-7)
        kept = sign0(w0[k]) == ref[0][k]
        assert 0 < kept.sum() < kept.size
        np.testing.assert_array_equal(ours[0][k][kept], ref[0][k][kept])
    exact = binax.binarize(jax.tree.map(jnp.asarray, w0))
    assert all(set(np.unique(np.asarray(x))) == {-1.0, 1.0} for x in exact.values())


def test_bop_keeps_weight_on_exact_tie():
    # w*m == tau exactly: binax keeps the weight (Larq would set it to +1).
    w = {"k": jnp.array([-1.0, 1.0])}
    tx = binax.bop(threshold=0.5, gamma=1.0)
    u, _ = tx.update({"k": jnp.array([-0.5, 0.5])}, tx.init(w), w)
    np.testing.assert_array_equal(u["k"], [0.0, 0.0])


@pytest.mark.parametrize(
    "bias_correction,tau",
    [(None, 1e-2), ("rate", 1.5), ("rate", float(np.nextafter(F(1), F(0)))), ("adam", 0.5)],
    ids=["biased", "rate", "rate-below1", "adam"],
)
def test_bop2nd_order_flip_exact(bias_correction, tau):
    """``"rate"`` just below 1: the first signal is ``+-1`` or an ulp below, by the rounding
    of two true divisions, so divisions computed any other way (XLA's multiplication by the
    reciprocal) put weights on the other side of the threshold."""
    gamma, sigma, eps = 1e-2, 1e-2, 1e-10
    w0, grads = random_binary(6), random_grads(7)
    tx = binax.bop2nd_order(
        threshold=tau, gamma=gamma, sigma=sigma, bias_correction=bias_correction, eps=eps
    )
    ours, _ = run_binax(tx, w0, grads)
    ref = bop2_ref(w0, grads, tau, gamma, sigma, bias_correction, eps)
    assert_same_flips(ours, ref, w0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(learning_rate=1e-2, threshold=1e-6),
        dict(learning_rate=1e-2, threshold=1e-6, eps=1e-8),
        dict(learning_rate=1e-2, threshold=1e-6, momentum=0.9, eps=1e-9),
        dict(learning_rate=1e-2, threshold=1e-6, momentum=0.9, nesterov=True, weight_decay=1e-3),
        dict(learning_rate=1e-2, threshold=1e-6, momentum=0.5, dampening=0.5, weight_decay=1e-2),
        dict(learning_rate=1e-2, threshold=1e-5, momentum=0.9, flip_count_reset_every=50),
    ],
    ids=["plain", "eps", "momentum", "nesterov-wd", "dampening", "reset"],
)
def test_sgdat_flip_exact(kw):
    w0, grads = random_binary(8), random_grads(9)
    ours, state = run_binax(binax.sgdat(**kw), w0, grads)
    ref = sgdat_ref(
        w0,
        grads,
        kw["learning_rate"],
        kw["threshold"],
        kw.get("momentum", 0.0),
        kw.get("nesterov", False),
        kw.get("dampening", 0.0),
        kw.get("weight_decay", 0.0),
        kw.get("eps", 0.0),
        kw.get("flip_count_reset_every"),
    )
    assert_same_flips(ours, ref, w0)


def test_bfloat16_state_flip_exact():
    """``state_dtype=bfloat16``: float32 arithmetic, each new state rounded once to bfloat16."""
    w0, grads = random_binary(10), random_grads(11)
    ours, state = run_binax(
        binax.bop(threshold=1e-6, gamma=1e-2, state_dtype=jnp.bfloat16), w0, grads
    )
    assert {x.dtype for x in jax.tree.leaves(state) if x.ndim} == {jnp.dtype(jnp.bfloat16)}
    assert_same_flips(ours, bop_ref(w0, grads, lambda t: 1e-6, lambda t: 1e-2, store=bf16), w0)
    # and the rounding is not a no-op: without it the reference flips differently
    assert any(
        np.any(a[k] != b[k])
        for a, b in zip(ours, bop_ref(w0, grads, lambda t: 1e-6, lambda t: 1e-2), strict=True)
        for k in SHAPES
    )
    tx = binax.bop2nd_order(threshold=1e-2, gamma=1e-2, sigma=1e-2, state_dtype=jnp.bfloat16)
    ours, _ = run_binax(tx, w0, grads)
    assert_same_flips(ours, bop2_ref(w0, grads, 1e-2, 1e-2, 1e-2, None, 1e-10, store=bf16), w0)
    kw = dict(learning_rate=1e-2, threshold=1e-6, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ours, _ = run_binax(binax.sgdat(**kw, state_dtype=jnp.bfloat16), w0, grads)
    ref = sgdat_ref(w0, grads, 1e-2, 1e-6, 0.9, True, 0.0, 1e-3, store=bf16)
    assert_same_flips(ours, ref, w0)


def test_bfloat16_stochastic_rounding_flip_exact():
    """``rounding="stochastic"``: the same runs as above, each new state rounded to bfloat16
    stochastically, against a NumPy implementation of the documented random bits."""
    w0, grads = random_binary(10), random_grads(11)
    sr = dict(state_dtype=jnp.bfloat16, rounding="stochastic")
    ours, _ = run_binax(binax.bop(threshold=1e-6, gamma=1e-2, **sr), w0, grads)
    ref = bop_ref(w0, grads, lambda t: 1e-6, lambda t: 1e-2, store=bf16_stochastic(0, 1))
    assert_same_flips(ours, ref, w0)
    nearest = bop_ref(w0, grads, lambda t: 1e-6, lambda t: 1e-2, store=bf16)
    assert any(np.any(a[k] != b[k]) for a, b in zip(ours, nearest, strict=True) for k in SHAPES)
    tx = binax.bop2nd_order(threshold=1e-2, gamma=1e-2, sigma=1e-2, **sr)
    ours, _ = run_binax(tx, w0, grads)
    ref = bop2_ref(w0, grads, 1e-2, 1e-2, 1e-2, None, 1e-10, store=bf16_stochastic(0, 2))
    assert_same_flips(ours, ref, w0)
    kw = dict(learning_rate=1e-2, threshold=1e-6, momentum=0.9, nesterov=True, weight_decay=1e-3)
    ours, _ = run_binax(binax.sgdat(**kw, **sr), w0, grads)
    ref = sgdat_ref(w0, grads, 1e-2, 1e-6, 0.9, True, 0.0, 1e-3, store=bf16_stochastic(0, 4))
    assert_same_flips(ours, ref, w0)


def test_stochastic_rounding_is_unbiased_and_changes_with_the_step():
    """A value a quarter of the way from one bfloat16 to the next is stored as the upper one
    about a quarter of the time, and the draws differ from step to step."""
    x = 1.0 + 2.0**-9  # bfloat16 neighbours: 1 and 1 + 2**-7
    n = 100_000
    tx = binax.transforms.scale_by_ema(1.0, state_dtype=jnp.bfloat16, rounding="stochastic")
    state = tx.init(jnp.zeros(n))
    draws = []
    for _ in range(2):
        state = tx.init(jnp.zeros(n))._replace(count=state.count)  # m = 0, so m_new = x
        _, state = tx.update(jnp.full(n, x, jnp.float32), state)
        draws.append(np.asarray(state.ema, F))
    for d in draws:
        assert set(np.unique(d)) == {1.0, 1.0 + 2.0**-7}
        up = np.mean(d > 1.0)
        assert abs(up - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n), up  # E[stored] = x
    assert 0.3 < np.mean(draws[0] != draws[1]) < 0.45  # independent draws: 2 * 0.25 * 0.75
    nearest = binax.transforms.scale_by_ema(1.0, state_dtype=jnp.bfloat16)
    _, s = nearest.update(jnp.full(n, x, jnp.float32), nearest.init(jnp.zeros(n)))
    assert np.all(np.asarray(s.ema, F) == 1.0)


def test_sgdat_first_update_takes_descent_sign():
    w = {"k": jnp.array([1.0, 1.0, -1.0, -1.0])}
    tx = binax.sgdat()
    u, state = tx.update({"k": jnp.array([1e-3, -1e-3, 0.0, -2.0])}, tx.init(w), w)
    np.testing.assert_array_equal(optax.apply_updates(w, u)["k"], [-1.0, 1.0, -1.0, 1.0])
    np.testing.assert_array_equal(state[1].flips["k"], [1, 0, 0, 1])


@pytest.mark.parametrize(
    "lr,b1,b2", [(1e-3, 0.9, 0.99), (1e-2, 0.99, 0.9)], ids=["b0.9-0.99", "b0.99-0.9"]
)
def test_diode_flip_exact(lr, b1, b2):
    init_scale = 1e-3
    w0, grads = random_binary(10), random_grads(11)
    tx = binax.diode(learning_rate=lr, b1=b1, b2=b2, init_scale=init_scale, seed=3)
    m2_init = jax.tree.map(np.asarray, tx.init(jax.tree.map(jnp.asarray, w0))[1].ema)
    ours, _ = run_binax(tx, w0, grads)
    ref = diode_ref(w0, grads, m2_init, lr, b1, b2)
    assert_same_flips(ours, ref, w0)


def test_diode_keeps_weights_whose_gradients_are_exactly_zero():
    """Diode's sign EMA uses sign(0) = 0 (``torch.sign``), so a weight whose gradients are
    exactly zero never moves (with sign0 its latent state would drift and flip it to -1)."""
    lr, b1, b2 = 1e-2, 0.5, 0.5
    w0 = random_binary(20)
    dead = {k: np.random.default_rng(21).random(s) < 0.5 for k, s in SHAPES.items()}
    grads = [{k: np.where(dead[k], F(0), g[k]) for k in SHAPES} for g in random_grads(22, 60)]
    tx = binax.diode(learning_rate=lr, b1=b1, b2=b2, seed=4)
    m2_init = jax.tree.map(np.asarray, tx.init(jax.tree.map(jnp.asarray, w0))[1].ema)
    ours, _ = run_binax(tx, w0, grads)
    assert_same_flips(ours, diode_ref(w0, grads, m2_init, lr, b1, b2), w0, min_flips=20)
    for k in SHAPES:
        assert all(np.array_equal(w[k][dead[k]], w0[k][dead[k]]) for w in ours)


@pytest.mark.parametrize("b", [0.99, 0.9, 0.999])
def test_rates_one_minus_b_are_rounded_once(b):
    """``1 - b`` is computed as the references compute it, in Python floats, then rounded once
    (for b = 0.99, float32 0.01, where float32(1) - float32(0.99) is 0.00999999)."""
    g = jnp.asarray(np.random.default_rng(0).normal(size=64), jnp.float32)
    w = jnp.ones(64)
    rate = F(1.0 - b)
    assert rate != F(1) - F(b)
    diode = binax.diode(b1=b, b2=b, init_scale=0.0)
    _, (m1, m2, _) = diode.update(g, diode.init(w), w)
    np.testing.assert_array_equal(m1.ema, rate * np.asarray(g))
    np.testing.assert_array_equal(m2.ema, rate * (F(1e-4) * np.sign(np.asarray(g))))
    sgdat = binax.sgdat(learning_rate=1.0, momentum=0.5, dampening=b)
    _, (acc, _) = sgdat.update(g, sgdat.init(w), w)
    np.testing.assert_array_equal(acc.momentum, rate * np.asarray(g))


def test_diode_init_state():
    w0 = random_binary(12)
    tx = binax.diode(init_scale=1e-3, seed=5)
    m2 = jax.tree.map(np.asarray, tx.init(jax.tree.map(jnp.asarray, w0))[1].ema)
    for k in SHAPES:
        assert np.all(m2[k] * w0[k] <= 0), "each weight starts on its own side"
        assert np.all(np.abs(m2[k]) < 1e-3) and np.std(np.abs(m2[k])) > 1e-4
    again = tx.init(jax.tree.map(jnp.asarray, w0))[1].ema
    other = binax.diode(seed=6).init(jax.tree.map(jnp.asarray, w0))[1].ema
    np.testing.assert_array_equal(again["a"], m2["a"])
    assert not np.array_equal(np.asarray(other["a"]), m2["a"])


def test_cema_flip_exact():
    gamma, alpha = 1e-2, 1e-1
    w0, grads = random_binary(13), random_grads(14)
    ours, _ = run_binax(binax.cema(gamma=gamma, alpha=alpha), w0, grads)
    assert_same_flips(ours, cema_ref(w0, grads, gamma, alpha), w0)


def test_clip_latent_after_adam():
    rng = np.random.default_rng(15)
    w0 = {k: rng.uniform(-1, 1, size=s).astype(F) for k, s in SHAPES.items()}
    grads = random_grads(16, steps=50, scale=1.0)
    tx = optax.chain(optax.adam(0.1), binax.clip_latent(1.0))
    ours, _ = run_binax(tx, w0, grads)
    adam = optax.adam(0.1)
    w, s = jax.tree.map(jnp.asarray, w0), adam.init(w0)
    for g, got in zip(grads, ours, strict=True):
        u, s = adam.update(g, s, w)
        w = jax.tree.map(lambda p, x: jnp.clip(p + x, -1, 1), w, u)
        for k in SHAPES:
            np.testing.assert_allclose(got[k], w[k], atol=1e-6)
            assert np.all(np.abs(got[k]) <= 1.0)
        w = jax.tree.map(jnp.asarray, got)
    assert any(np.any(np.abs(o[k]) == 1.0) for o in ours for k in SHAPES), "clip never acted"
