"""Building blocks of the BNN optimizers: gradient statistics and flip rules.

Every BNN optimizer in binax is a short `optax.chain` of a *statistic* transform, which turns
gradients into a gradient-like signal ``s`` (positive means "this weight wants to decrease"), and a
*flip rule*, which turns ``s`` and the current weights ``w`` into flips. A flip is the additive
update ``-2 w`` (``optax.apply_updates`` adds updates to params), no flip is ``0``.

Conventions (see ``docs/optimizers.md``):

* ``ema(m, x, rate) = m + rate * (x - m)``.
* ``sign0(x) = +1 if x >= 0 else -1`` (never 0).
* Rates, thresholds and learning rates are floats or Optax schedules, evaluated at the update
  count *before* it is incremented (update ``k`` uses ``schedule(k)``); they all work under
  `optax.inject_hyperparams`.
* A flip rule needs ``params`` and must be the last transform of its chain (anything after it
  would rescale the flip).

Non-finite values. A state element whose new value would be NaN or infinite keeps its previous
value: a NaN or infinite gradient element is skipped for that element (as if that step had not
happened for it), and no statistic can be poisoned for good. A flip rule given a NaN signal keeps
the weight. So no gradient can turn a weight into NaN or move it off {-1, +1}. To skip whole steps
with non-finite gradients instead, wrap the optimizer in `optax.apply_if_finite`.

State dtypes. ``state_dtype`` is the dtype a statistic's state is *stored* in (``bfloat16``
halves the memory). The arithmetic is done in float32 (or in ``state_dtype`` if wider) and the
new state is rounded once when stored, as Optax does with ``mu_dtype``; the output signal is
computed from the stored values, in that compute dtype. Rounded to nearest, a bfloat16 EMA
loses every step ``rate * (x - m)`` smaller than half an ulp of ``m`` (about 2^-9 of it): with
small rates (Bop's 1e-4) the average lags. ``rounding="stochastic"`` rounds up or down at
random, with the probabilities that make the stored value unbiased, so small steps survive on
average; it draws its bits from a hash of the seed, the update count and the element index
(no state, reproducible). On digits neither rounding changed the accuracy measurably
(BENCHMARKS.md, section 2).

Abstract params. ``init`` on `jax.ShapeDtypeStruct` params (as Optax's sharding tests call it)
returns the state with the right shapes, dtypes and shardings: zeros, as in Optax, and a
`jax.ShapeDtypeStruct` for each leaf whose initial value depends on the sign of a weight
(Diode's sign EMA, SGDAT's packed flip counts). ``jax.eval_shape(tx.init, params)`` gives
the all-abstract state. A state to train with needs the actual params.

Real-valued weights. Every flip rule computes the new weight as ``sign0`` of something, so a
real-valued leaf (for example a Glorot-initialised kernel) is binarized by its first update, as
Bop's reference code does. Through an additive update this is exact where the new weight has the
sign of the old one; where the sign changes, ``w + (w' - w)`` can round to within a few ulps of
``w'`` (``0.3 + (-1 - 0.3)`` is not exactly ``-1`` in float32), with the right sign. Weights that
start exactly at +1/-1 stay exactly there, in any float dtype. To start exactly binary, apply
`binax.binarize` to the params first (the `binax.nn` layers initialise binary kernels exactly).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from binax import _checks
from binax._hashing import mix32
from binax._ops import sign0

ScalarOrSchedule = optax.ScalarOrSchedule


def _value(hparam: ScalarOrSchedule, count: jax.Array, dtype) -> jax.Array:
    """A hyperparameter at update ``count`` (a schedule is evaluated), cast to ``dtype``."""
    value = hparam(count) if callable(hparam) else hparam
    return jnp.asarray(value, dtype)


def _keep_finite(new: jax.Array, old: jax.Array) -> jax.Array:
    """``where(isfinite(new), new, old)``, written so that it stays cheap when updated in place.

    For float32 and wider this is a sum of two selects, equal to the ``where`` except that a
    zero comes out as ``+0.0`` (``x + 0.0`` is ``x`` for every ``x`` but ``-0.0``). Why: when the
    state is donated (as in training), XLA:CPU's LLVM turns ``store(select(ok, new, load(p)), p)``
    into masked stores (``vmaskmovps``), slow on AMD CPUs: ~30% of a whole optimizer step
    (``benchmarks/nonfinite_guard.py``). The sum cannot be folded back into that select. For
    16-bit dtypes the ``where`` is kept: there the sum (an emulated bfloat16 add) splits XLA's
    fusions and costs more than it saves.
    """
    ok = jnp.isfinite(new)
    if jnp.dtype(new.dtype).itemsize < 4:
        return jnp.where(ok, new, old)
    zero = jnp.zeros((), new.dtype)
    return jnp.where(ok, new, zero) + jnp.where(ok, zero, old)


def _compute_dtype(state_dtype) -> jnp.dtype:
    """The dtype the statistics are computed in: float32, or ``state_dtype`` if wider."""
    return jnp.promote_types(state_dtype, jnp.float32)


def _store(new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` rounded once to the dtype of the state element ``old``; ``old`` where not finite.

    Rounding can overflow a narrow dtype (a float32 above 65504 is ``inf`` in float16), so the
    finite check is on the rounded value.
    """
    return _keep_finite(new.astype(old.dtype), old)


def _storer(rounding: str, seed: int | jax.Array, count: jax.Array, kind: int):
    """``store(stream, new, old)``: ``new`` stored like ``old`` (see `_store`), rounded to
    nearest or stochastically.

    Stochastic rounding (to bfloat16) adds 16 random bits below bfloat16's last bit of the
    float32 value and truncates: the value is rounded up with probability equal to its distance
    from the bfloat16 below, so the stored value is unbiased and small EMA steps are not lost
    (Gupta et al., "Deep Learning with Limited Numerical Precision", ICML 2015). The bits hash
    (seed, ``kind`` of statistic, stream, update count, element index): runs are reproducible
    and resume exactly, and two statistics of different kinds never share bits.
    """
    if rounding == "nearest":
        return lambda stream, new, old: _store(new, old)
    seed32 = mix32(_seed32(seed) + jnp.uint32(kind))

    def store(stream, new, old):
        # one mix per element (the key is already a full hash of seed, stream and count)
        noise = mix32(_element_index(old) ^ _stream_key(seed32, stream, count)) & 0xFFFF
        bits = jax.lax.bitcast_convert_type(new.astype(jnp.float32), jnp.uint32)
        up = (bits + noise) & jnp.uint32(0xFFFF0000)  # a bfloat16 value: the cast is exact
        return _store(jax.lax.bitcast_convert_type(up, jnp.float32), old)  # inf is kept out

    return store


def _map_indexed(f, tree, *rest):
    """``jax.tree.map(f, tree, *rest)``, passing each leaf's index in ``tree`` first."""
    leaves, treedef = jax.tree.flatten(tree)
    others = [treedef.flatten_up_to(t) for t in rest]
    pairs = enumerate(zip(leaves, *others, strict=True))
    return treedef.unflatten([f(i, *xs) for i, xs in pairs])


def _read_back(stored: Any) -> Any:
    """The newly stored state, for computing the output from it.

    For 16-bit state, XLA:CPU would otherwise recompute the rounding and the finite check in the
    consumer, which then reads the old and the new state (and copies the old first, as it is
    updated in place): 2-3x the step time. An optimization barrier makes the consumer read the
    stored array instead. Float32 and wider state is left alone (XLA already does that there).
    """
    if all(jnp.dtype(x.dtype).itemsize >= 4 for x in jax.tree.leaves(stored)):
        return stored
    return jax.lax.platform_dependent(stored, cpu=jax.lax.optimization_barrier, default=lambda x: x)


def _zeros(params: Any, dtype) -> Any:
    """Zeros like ``params`` (shape and sharding) in ``dtype``."""
    return jax.tree.map(lambda p: jnp.zeros_like(p, dtype=dtype), params)


def _ema(m: jax.Array, x: jax.Array, rate: jax.Array) -> jax.Array:
    return m + rate * (x - m)


def one_minus(b: Any) -> Any:
    """``1 - b`` as the reference implementations compute it: for a Python number in Python
    (double precision), so that it is rounded once, when cast to the compute dtype (``1 - 0.99``
    becomes float32 ``0.01``, where ``float32(1) - float32(0.99)`` is ``0.00999999``). An array
    (under `optax.inject_hyperparams` ``b`` is one, already rounded) is subtracted in its dtype.
    """
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        return 1.0 - b
    return 1 - jnp.asarray(b)


def _true_divide(x: jax.Array, d: jax.Array) -> jax.Array:
    """``x / d`` for a scalar ``d``, rounded as one true division per element (as NumPy, PyTorch
    and TensorFlow's references compute it), also where the quotient is divided again.

    XLA's simplifier rewrites ``x / d`` (``d`` broadcast) into ``x * (1 / d)`` and ``(x / d) / y``
    into ``x / (d * y)``; both round differently (an ulp off in about a quarter of the elements).
    Adding ``z = 0 * x`` to the divisor and to the quotient stops both rewrites (XLA does not fold
    ``0 * x``, which is NaN for an infinite ``x``) and changes no value: for finite ``x`` (state
    always is, see `_store`) ``z`` is a zero with the sign of ``x`` and of the quotient.
    ``tests/test_transforms.py`` checks the compiled HLO.
    """
    z = jnp.zeros((), x.dtype) * x
    return x / (d + z) + z


def _abstract_like(w: jax.ShapeDtypeStruct, dtype) -> jax.ShapeDtypeStruct:
    """The state leaf of an abstract weight whose initial value depends on the weight's value:
    its shape and sharding, in ``dtype``, as a `jax.ShapeDtypeStruct` (as `jax.eval_shape`
    gives; Optax's sharding tests build a state from `jax.ShapeDtypeStruct` params)."""
    return jax.ShapeDtypeStruct(w.shape, dtype, sharding=w.sharding)


def _flip_update(w: jax.Array, w_new: jax.Array) -> jax.Array:
    """The additive update that turns ``w`` into ``w_new``, in the dtype of ``w``."""
    return (w_new.astype(w.dtype) - w).astype(w.dtype)


# ----------------------------------------------------------------------------------------------
# Statistics.


class ScaleByEmaState(NamedTuple):
    """State of `scale_by_ema`."""

    count: jax.Array  # int32 scalar: updates so far.
    ema: optax.Updates


def scale_by_ema(
    rate: ScalarOrSchedule,
    *,
    state_dtype: Any = None,
    rounding: str = "nearest",
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the gradient by its exponential moving average.

    .. math::
        m_t = m_{t-1} + \gamma_t (g_t - m_{t-1}), \qquad \text{output } m_t,

    with :math:`m_0 = 0` and no bias correction. This is Bop's filter (Helwegen et al., 2019) and,
    chained twice, CEMA's (Quist et al., 2023).

    Args:
      rate: :math:`\gamma`, in (0, 1]; a float or an Optax schedule of the update count.
      state_dtype: dtype (default float32) the moving average is stored in (see "State
        dtypes" in the module docstring).
      rounding: how new state is rounded to ``state_dtype``: ``"nearest"`` or, for bfloat16
        state, ``"stochastic"`` (see "State dtypes").
      seed: an int or a JAX PRNG key for stochastic rounding.

    Returns:
      An `optax.GradientTransformationExtraArgs`.
    """
    _checks.check_rate("rate", rate)
    dtype = _checks.check_state_dtype("state_dtype", state_dtype)
    _checks.check_rounding("rounding", rounding, dtype)

    def init_fn(params):
        return ScaleByEmaState(count=jnp.zeros([], jnp.int32), ema=_zeros(params, dtype))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        _checks.check_same_structure(
            "scale_by_ema", updates, state.ema, "the state (built by init from the params)"
        )
        c = _compute_dtype(dtype)
        r = _value(rate, state.count, c)
        store = _storer(rounding, seed, state.count, kind=1)
        ema = _map_indexed(
            lambda i, m, g: store(i, _ema(m.astype(c), g.astype(c), r), m), state.ema, updates
        )
        out = jax.tree.map(lambda m: m.astype(c), _read_back(ema))
        return out, ScaleByEmaState(count=optax.safe_increment(state.count), ema=ema)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ScaleByMomentRatioState(NamedTuple):
    """State of `scale_by_moment_ratio`."""

    count: jax.Array
    mu: optax.Updates  # first-moment EMA
    nu: optax.Updates  # second-moment EMA


BIAS_CORRECTIONS = (None, "rate", "adam")


def scale_by_moment_ratio(
    gamma: ScalarOrSchedule,
    sigma: ScalarOrSchedule,
    *,
    bias_correction: str | None = None,
    eps: float = 1e-10,
    state_dtype: Any = None,
    rounding: str = "nearest",
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the gradient by the ratio of its first- and second-moment EMAs.

    .. math::
        m_t &= m_{t-1} + \gamma_t (g_t - m_{t-1}) \\
        v_t &= v_{t-1} + \sigma_t (g_t^2 - v_{t-1}) \\
        s_t &= \hat m_t / (\sqrt{\hat v_t} + \epsilon)

    where, by ``bias_correction``:

    * ``None`` (biased, the paper's default): :math:`\hat m = m, \hat v = v`;
    * ``"rate"`` (the authors' released "unbiased" code): :math:`\hat m = m/\gamma_t,
      \hat v = v/\sigma_t`;
    * ``"adam"`` (Adam-style): :math:`\hat m = m/(1-(1-\gamma_t)^{t+1}),
      \hat v = v/(1-(1-\sigma_t)^{t+1})`.

    This is the statistic of Bop2ndOrder (Suarez-Ramirez et al., "A Bop and Beyond", CVPR
    Workshops 2021).

    Args:
      gamma: first-moment rate, in (0, 1]; float or schedule.
      sigma: second-moment rate, in (0, 1]; float or schedule.
      bias_correction: ``None``, ``"rate"`` or ``"adam"``.
      eps: added to the root of the second moment; >= 0.
      state_dtype: dtype (default float32) both moments are stored in (see "State dtypes").
      rounding: how new state is rounded to ``state_dtype``: ``"nearest"`` or, for bfloat16
        state, ``"stochastic"`` (see "State dtypes").
      seed: an int or a JAX PRNG key for stochastic rounding.
    """
    _checks.check_rate("gamma", gamma)
    _checks.check_rate("sigma", sigma)
    _checks.check_nonnegative("eps", eps, schedule_ok=False)
    if bias_correction not in BIAS_CORRECTIONS:
        raise ValueError(
            f"bias_correction must be one of {BIAS_CORRECTIONS}, got {bias_correction!r}"
        )
    dtype = _checks.check_state_dtype("state_dtype", state_dtype)
    _checks.check_rounding("rounding", rounding, dtype)

    def init_fn(params):
        return ScaleByMomentRatioState(
            count=jnp.zeros([], jnp.int32), mu=_zeros(params, dtype), nu=_zeros(params, dtype)
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        _checks.check_same_structure(
            "scale_by_moment_ratio", updates, state.mu, "the state (built by init from the params)"
        )
        c = _compute_dtype(dtype)
        g_rate = _value(gamma, state.count, c)
        s_rate = _value(sigma, state.count, c)
        e = jnp.asarray(eps, c)
        one = jnp.ones((), c)
        if bias_correction == "rate":
            m_scale, v_scale = g_rate, s_rate
        elif bias_correction == "adam":
            t = (state.count + 1).astype(c)
            m_scale = one - (one - g_rate) ** t
            v_scale = one - (one - s_rate) ** t

        store = _storer(rounding, seed, state.count, kind=2)
        mu = _map_indexed(
            lambda i, m, g: store(2 * i, _ema(m.astype(c), g.astype(c), g_rate), m),
            state.mu,
            updates,
        )
        nu = _map_indexed(
            lambda i, v, g: store(2 * i + 1, _ema(v.astype(c), jnp.square(g.astype(c)), s_rate), v),
            state.nu,
            updates,
        )

        def ratio(m, v):
            m, v = m.astype(c), v.astype(c)
            if bias_correction is None:
                return m / (jnp.sqrt(v) + e)
            return _true_divide(m, m_scale) / (jnp.sqrt(_true_divide(v, v_scale)) + e)

        s = jax.tree.map(ratio, *_read_back((mu, nu)))
        return s, ScaleByMomentRatioState(optax.safe_increment(state.count), mu, nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ScaleBySignEmaState(NamedTuple):
    """State of `scale_by_sign_ema`."""

    count: jax.Array
    ema: optax.Updates


def scale_by_sign_ema(
    learning_rate: ScalarOrSchedule,
    b2: float,
    *,
    init_scale: float = 1e-3,
    seed: int | jax.Array = 0,
    state_dtype: Any = None,
    rounding: str = "nearest",
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the incoming signal by an EMA of its learning-rate-scaled sign.

    .. math::
        m_t = m_{t-1} + (1 - \beta_2)(\eta_t\,\mathrm{sign}(x_t) - m_{t-1}), \qquad
        \text{output } m_t,

    with :math:`\mathrm{sign}(0) = 0` and :math:`m_0 = -\mathrm{sign0}(w)\,u\,s_0`, :math:`u \sim
    U[0, 1)` drawn per weight from ``seed`` (by a counter-based hash of the seed and the weight's
    index, cheap to compile) and :math:`s_0` = ``init_scale``: each weight starts
    on its own side, at a random distance from the flip point. Chained after
    ``scale_by_ema(1 - b1)`` this is the binary branch of Diode (Guo et al., "Stochastic Sign
    Descent", ECCV 2024); ``-m`` acts as a bounded latent weight.

    Args:
      learning_rate: :math:`\eta`, > 0; float or schedule.
      b2: decay :math:`\beta_2` of the sign EMA, in [0, 1).
      init_scale: :math:`s_0` >= 0.
      seed: an int or a JAX PRNG key for the initial state (and stochastic rounding).
      state_dtype: dtype (default float32) the EMA is stored in (see "State dtypes").
      rounding: how new state is rounded to ``state_dtype``: ``"nearest"`` or, for bfloat16
        state, ``"stochastic"`` (see "State dtypes").
    """
    _checks.check_positive("learning_rate", learning_rate)
    _checks.check_beta("b2", b2)
    _checks.check_nonnegative("init_scale", init_scale, schedule_ok=False)
    dtype = _checks.check_state_dtype("state_dtype", state_dtype)
    _checks.check_rounding("rounding", rounding, dtype)

    def init_fn(params):
        if params is None:
            raise ValueError(
                "scale_by_sign_ema: `init` needs the params (the initial state "
                "depends on the sign of each weight)"
            )
        _checks.check_float_leaves("scale_by_sign_ema", params)
        seed32 = _seed32(seed)
        leaves, treedef = jax.tree.flatten(params)
        values = {i: w for i, w in enumerate(leaves) if not isinstance(w, jax.ShapeDtypeStruct)}
        scale = jnp.asarray(init_scale, dtype)

        @jax.jit  # one small program instead of many eagerly dispatched ops
        def initial(values, seed32, scale):
            return {
                i: -sign0(w).astype(dtype) * _uniform_like(w, seed32, i, dtype) * scale
                for i, w in values.items()
            }

        ema = initial(values, seed32, scale)
        ema = [ema[i] if i in ema else _abstract_like(w, dtype) for i, w in enumerate(leaves)]
        return ScaleBySignEmaState(
            count=jnp.zeros([], jnp.int32), ema=jax.tree.unflatten(treedef, ema)
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        _checks.check_same_structure(
            "scale_by_sign_ema", updates, state.ema, "the state (built by init from the params)"
        )
        c = _compute_dtype(dtype)
        lr = _value(learning_rate, state.count, c)
        rate = jnp.asarray(one_minus(b2), c)
        store = _storer(rounding, seed, state.count, kind=3)
        ema = _map_indexed(
            lambda i, m, x: store(i, _ema(m.astype(c), lr * jnp.sign(x).astype(c), rate), m),
            state.ema,
            updates,
        )
        out = jax.tree.map(lambda m: m.astype(c), _read_back(ema))
        return out, ScaleBySignEmaState(count=optax.safe_increment(state.count), ema=ema)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _seed32(seed: int | jax.Array) -> jax.Array:
    """A uint32 seed from an int (or integer array) or a JAX PRNG key."""
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        seed = jax.random.key_data(seed)
    if isinstance(seed, bool) or not jnp.issubdtype(jnp.result_type(seed), jnp.integer):
        raise TypeError(f"seed must be an int or a JAX PRNG key, got {seed!r}")
    words = jnp.ravel(jnp.asarray(seed)).astype(jnp.uint32)
    out = jnp.uint32(0x2545F491)
    for k in range(words.shape[0]):
        out = mix32(out ^ words[k])
    return out


def _stream_key(seed32: jax.Array, stream: int, count: jax.Array | None = None) -> jax.Array:
    """A uint32 key for random stream ``stream`` of a seed (and, if given, of an update count)."""
    key = mix32(seed32 ^ mix32(jnp.uint32(stream) * jnp.uint32(0x9E3779B9)))
    if count is not None:
        key = mix32(key ^ mix32(count.astype(jnp.uint32) + jnp.uint32(0x7F4A7C15)))
    return key


def _element_index(w: jax.Array) -> jax.Array:
    """Each element's row-major index in ``w`` (uint32, its shape and sharding): the counter
    for counter-based random bits. Unlike `jax.random`, nothing heavy to compile when ``init``
    runs eagerly (threefry took seconds per leaf shape), and it fuses into elementwise code."""
    shape = jnp.shape(w)
    sharding = jax.typeof(w).sharding
    idx = jnp.zeros(shape, jnp.uint32) if not shape else None
    stride = 1
    for d in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, d, out_sharding=sharding)
        idx = iota * jnp.uint32(stride) if idx is None else idx + iota * jnp.uint32(stride)
        stride = (stride * shape[d]) % (1 << 32)
    return idx


def _uniform_like(w: jax.Array, seed32: jax.Array, stream: int, dtype) -> jax.Array:
    """U[0, 1) per element of ``w`` (its shape and sharding), from a hash of the element index."""
    key = _stream_key(seed32, stream)
    bits = mix32(mix32(_element_index(w) ^ key) + key)
    u = (bits >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)  # 24 random bits: exact in f32
    below_one = jnp.asarray(jnp.nextafter(jnp.ones((), dtype), jnp.zeros((), dtype)), dtype)
    return jnp.minimum(u.astype(dtype), below_one)  # rounding to a narrow dtype stays < 1


class ScaleByAccumulationState(NamedTuple):
    """State of `scale_by_accumulation`."""

    count: jax.Array
    accumulator: optax.Updates
    momentum: optax.Updates | None  # None without momentum (momentum None or a Python 0)


def scale_by_accumulation(
    learning_rate: ScalarOrSchedule,
    *,
    momentum: float | None = None,
    nesterov: bool = False,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    reset_every: int | None = None,
    state_dtype: Any = None,
    rounding: str = "nearest",
    seed: int | jax.Array = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Replaces the gradient by a never-reset sum of SGD steps (SGDAT's accumulator).

    .. math::
        d_t &= g_t + \lambda w \\
        b_t &= \mu b_{t-1} + (1 - \tau) g_t, \quad
        d_t \leftarrow d_t + \mu b_t \text{ (nesterov) or } b_t \qquad (\text{only if } \mu > 0) \\
        a_t &= a_{t-1} + \eta_t d_t, \qquad \text{output } a_t

    The momentum buffer is fed the raw gradient, as in the reference code, so with plain (not
    Nesterov) momentum the weight decay :math:`\lambda` has no effect. The accumulator is never
    clipped or reset (Gu Shan et al., "SGD with Adaptive Threshold", Neurocomputing 2023).

    Args:
      learning_rate: :math:`\eta` > 0; float or schedule.
      momentum: :math:`\mu` >= 0, or ``None`` (the default): no momentum. A momentum buffer is
        kept unless momentum is ``None`` or a Python 0, so the state's structure is fixed when
        the transform is built: under `optax.inject_hyperparams` (where numbers become arrays)
        ``None`` keeps the state of the plain transform, and an injected momentum can be
        changed between steps, but not from or to "no momentum".
      nesterov: Nesterov momentum.
      dampening: :math:`\tau` in [0, 1].
      weight_decay: :math:`\lambda` >= 0; needs ``params`` when not 0.
      reset_every: if set, the momentum buffer is zeroed before updates ``k * reset_every``
        (``k >= 1``): the reference script rebuilds its optimizer every epoch.
      state_dtype: dtype (default float32) the accumulator and the momentum buffer are stored
        in (see "State dtypes").
      rounding: how new state is rounded to ``state_dtype``: ``"nearest"`` or, for bfloat16
        state, ``"stochastic"`` (see "State dtypes").
      seed: an int or a JAX PRNG key for stochastic rounding.
    """
    _checks.check_positive("learning_rate", learning_rate)
    if momentum is not None:
        _checks.check_nonnegative("momentum", momentum, schedule_ok=False)
    _checks.check_scalar(
        "dampening", dampening, lambda x: 0.0 <= x <= 1.0, "in [0, 1]", schedule_ok=False
    )
    _checks.check_nonnegative("weight_decay", weight_decay, schedule_ok=False)
    _checks.check_reset_every("reset_every", reset_every)
    dtype = _checks.check_state_dtype("state_dtype", state_dtype)
    _checks.check_rounding("rounding", rounding, dtype)
    # Decided by the argument's type, never by an array's value: init and update (and init under
    # jit, where optax.inject_hyperparams's arrays are traced) must agree on the state's structure.
    use_momentum = not (momentum is None or (isinstance(momentum, (int, float)) and momentum == 0))
    use_decay = not (isinstance(weight_decay, (int, float)) and weight_decay == 0)

    def init_fn(params):
        return ScaleByAccumulationState(
            count=jnp.zeros([], jnp.int32),
            accumulator=_zeros(params, dtype),
            momentum=_zeros(params, dtype) if use_momentum else None,
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.check_same_structure(
            "scale_by_accumulation",
            updates,
            state.accumulator,
            "the state (built by init from the params)",
        )
        c = _compute_dtype(dtype)
        lr = _value(learning_rate, state.count, c)
        store = _storer(rounding, seed, state.count, kind=4)
        g = jax.tree.map(lambda x: x.astype(c), updates)
        d = g
        if use_decay:
            if params is None:
                raise ValueError(
                    "scale_by_accumulation: `params` is required when weight_decay is not 0"
                )
            wd = jnp.asarray(weight_decay, c)
            d = jax.tree.map(lambda x, w: x + wd * w.astype(c), g, params)
        buf = state.momentum
        if use_momentum:
            mu = jnp.asarray(momentum, c)
            damp = jnp.asarray(one_minus(dampening), c)
            keep = _not_reset(state.count, reset_every, dtype)
            buf = _map_indexed(
                lambda i, b, x: store(2 * i + 1, mu * (b * keep).astype(c) + damp * x, b * keep),
                buf,
                g,
            )
            if nesterov:
                d = jax.tree.map(lambda x, b: x + mu * b.astype(c), d, buf)
            else:
                d = jax.tree.map(lambda x, b: jnp.where(mu > 0, b.astype(c), x), d, buf)
        acc = _map_indexed(
            lambda i, a, x: store(2 * i, a.astype(c) + lr * x, a), state.accumulator, d
        )
        out = jax.tree.map(lambda a: a.astype(c), _read_back(acc))
        return out, ScaleByAccumulationState(optax.safe_increment(state.count), acc, buf)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _not_reset(count: jax.Array, reset_every: int | None, dtype) -> jax.Array:
    """0 before updates ``k * reset_every`` (k >= 1), else 1."""
    if reset_every is None:
        return jnp.ones((), dtype)
    reset = (count > 0) & (count % reset_every == 0)
    return jnp.where(reset, 0, 1).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Flip rules.


class FlipState(NamedTuple):
    """State of `flip_by_threshold` (the count evaluates threshold schedules)."""

    count: jax.Array


def flip_by_threshold(threshold: ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    r"""Flips each binary weight whose signal agrees with it by more than a threshold.

    .. math::
        \text{flip} = w\,s > \tau_t, \qquad
        w' = \mathrm{sign0}(-w) \text{ if flip else } \mathrm{sign0}(w), \qquad u = w' - w.

    For :math:`w = \pm 1` a flip happens when :math:`|s| > \tau` and :math:`s` has the sign of
    :math:`w` (the signal says "decrease"), and the update is :math:`-2w`. On an exact tie
    :math:`w s = \tau` the weight is kept (Larq's Bop instead sets it to +1). A real-valued
    :math:`w` is binarized by the first update. This is the flip rule of Bop (Helwegen et al.,
    NeurIPS 2019), Bop2ndOrder and CEMA. Must be the last transform of its chain; needs
    ``params``.

    Args:
      threshold: :math:`\tau` >= 0; float or schedule.
    """
    _checks.check_nonnegative("threshold", threshold)

    def init_fn(params):
        del params
        return FlipState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.check_params("flip_by_threshold", updates, params)

        def flip(s, w):
            tau = _value(threshold, state.count, jnp.result_type(s))
            # sign0(-w) on a flip, sign0(w) otherwise, in one select.
            one = jnp.ones((), w.dtype)
            w_new = jnp.where((w >= 0) != (w * s > tau), one, -one)
            return _flip_update(w, w_new)

        return jax.tree.map(flip, updates, params), FlipState(optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def flip_to_descent_sign() -> optax.GradientTransformationExtraArgs:
    r"""Sets each binary weight to the descent direction of its signal.

    .. math::
        w' = -1 \text{ if } s > 0 \text{ else } +1, \qquad u = w' - w,

    so ``s == 0`` gives +1, and a NaN signal keeps ``sign0(w)``. This is Diode's rule (Guo et al.,
    ECCV 2024), where ``s`` is the sign EMA of `scale_by_sign_ema`; a real-valued ``w`` is
    binarized by the first update (Diode's reference flips ``w`` to ``-w`` and never binarizes;
    both agree on binary weights). Must be the last transform of its chain; needs ``params``.
    """

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.check_params("flip_to_descent_sign", updates, params)

        def flip(s, w):
            w_new = jnp.where(jnp.isnan(s), sign0(w), sign0(-s).astype(w.dtype))
            return _flip_update(w, w_new)

        return jax.tree.map(flip, updates, params), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class AdaptiveFlipState(NamedTuple):
    """State of `flip_by_adaptive_threshold`.

    Per weight, one integer ``packed = 4 n + 2 [moved at the last update] + [w < 0]``: the flip
    count ``n``, whether the last update moved the weight, and the weight's sign. Packed this
    way, the counts are updated without reading the weights and the weights from the new packed
    value alone, so XLA updates both in place in two loops without copying either (with
    separate arrays each update reads the other's old value; see
    ``benchmarks/optimizer_step.py``). Read the counts with ``state.flips``.
    """

    count: jax.Array
    packed: optax.Updates

    @property
    def flips(self) -> optax.Updates:
        """Per-weight flip counts."""
        return jax.tree.map(lambda v: v >> 2, self.packed)


def flip_by_adaptive_threshold(
    threshold: ScalarOrSchedule,
    *,
    eps: float = 0.0,
    reset_every: int | None = None,
    count_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Moves each weight to the descent sign of its signal once it beats its own threshold.

    .. math::
        \text{move} = |s| > \tau_t n + \epsilon, \qquad
        w' = \mathrm{sign0}(-s) \text{ if move else } \mathrm{sign0}(w), \qquad
        n \leftarrow n + [w' \ne \mathrm{sign0}(w)], \qquad u = w' - w.

    The per-weight threshold grows with the weight's own flip count ``n``, so a weight that has
    flipped often needs an ever stronger signal (SGDAT, Gu Shan et al., Neurocomputing 2023).
    With ``n = 0`` the threshold is ``eps``. A real-valued ``w`` is binarized by the first update;
    binarizing is not counted as a flip. A NaN signal never moves a weight. Must be the last
    transform of its chain; needs ``params``.

    Args:
      threshold: :math:`\tau` >= 0; float or schedule.
      eps: :math:`\epsilon` >= 0 (the published runs used 1e-8; default 0).
      reset_every: if set, the flip counts are zeroed before updates ``k * reset_every``
        (``k >= 1``), as the reference does by rebuilding its optimizer each epoch.
      count_dtype: integer dtype (default int32) of the flip counts. Counts saturate (never wrap
        around) at ``(max - 3) // 4`` of the dtype: 31 for int8, 8191 for int16.
    """
    _checks.check_nonnegative("threshold", threshold)
    _checks.check_nonnegative("eps", eps, schedule_ok=False)
    _checks.check_reset_every("reset_every", reset_every)
    cdt = _checks.as_dtype("count_dtype", jnp.int32 if count_dtype is None else count_dtype)
    if not jnp.issubdtype(cdt, jnp.integer):
        raise TypeError(f"count_dtype must be an integer dtype, got {cdt}")
    cmax = (int(jnp.iinfo(cdt).max) - 3) // 4  # the largest count that packs

    def init_fn(params):
        _checks.check_float_leaves("flip_by_adaptive_threshold", params)

        def initial(w):
            if isinstance(w, jax.ShapeDtypeStruct):
                return _abstract_like(w, cdt)
            return (sign0(w) < 0).astype(cdt)

        packed = jax.tree.map(initial, params)
        return AdaptiveFlipState(count=jnp.zeros([], jnp.int32), packed=packed)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.check_params("flip_by_adaptive_threshold", updates, params)
        keep = _not_reset(state.count, reset_every, cdt)

        def new_packed(s, v):
            dt = jnp.result_type(s)
            n = (v >> 2) * keep
            tau = _value(threshold, state.count, dt)
            move = jnp.abs(s) > tau * n.astype(dt) + jnp.asarray(eps, dt)
            old = jnp.where((v & 1) == 1, -1, 1).astype(dt)
            new = jnp.where(move, sign0(-s), old)
            n = jnp.where((new != old) & (n < cmax), n + 1, n)
            return (4 * n + 2 * move + (new < 0)).astype(cdt)

        def new_weight(w, v):
            one = jnp.ones((), w.dtype)
            target = jnp.where((v & 1) == 1, -one, one)  # the descent sign, where it moved
            return _flip_update(w, jnp.where((v & 2) != 0, target, sign0(w)))

        packed = jax.tree.map(new_packed, updates, state.packed)
        u = jax.tree.map(new_weight, params, packed)
        return u, AdaptiveFlipState(optax.safe_increment(state.count), packed)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------------------------
# Latent weights.


def clip_latent(limit: float = 1.0) -> optax.GradientTransformationExtraArgs:
    r"""Keeps latent weights in ``[-limit, limit]`` after the update (BinaryConnect's clip).

    The update becomes :math:`\mathrm{clip}(w + u, -l, l) - w`, corrected by one ulp where float
    rounding would land ``w + u`` just outside the box, so ``optax.apply_updates`` always gives
    ``|w| <= l``. Chain it last after any Optax optimizer to train latent real-valued weights
    whose forward pass uses ``sign0(w)`` with a straight-through estimator (Courbariaux et al.,
    2015; Larq's ``weight_clip``). Needs ``params``.

    Args:
      limit: :math:`l` > 0.
    """
    _checks.check_positive("limit", limit, schedule_ok=False)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _checks.check_params("clip_latent", updates, params)

        def clip(u, w):
            lim = jnp.asarray(limit, w.dtype)
            u = (jnp.clip(w + u.astype(w.dtype), -lim, lim) - w).astype(w.dtype)
            new = w + u
            u = jnp.where(new > lim, jnp.nextafter(u, -jnp.inf), u)
            return jnp.where(new < -lim, jnp.nextafter(u, jnp.inf), u)

        return jax.tree.map(clip, updates, params), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
