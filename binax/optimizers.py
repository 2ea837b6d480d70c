"""The BNN optimizers: each a short `optax.chain` of the building blocks in `binax.transforms`.

Each returns an `optax.GradientTransformationExtraArgs` meant for the *binary* leaves of a model;
combine it with an ordinary Optax optimizer for the real-valued leaves through `binax.partition`.
Every flip rule needs ``params`` in ``update``. All rates, thresholds and learning rates take a
float or an Optax schedule and work under `optax.inject_hyperparams` (pass
``hyperparam_dtype=jnp.float32`` there when params are bfloat16, or the hyperparameters are
rounded to bfloat16).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from binax import _checks
from binax import transforms as T

ScalarOrSchedule = optax.ScalarOrSchedule


def bop(
    threshold: ScalarOrSchedule = 1e-8,
    gamma: ScalarOrSchedule = 1e-4,
    *,
    state_dtype: Any = None,
    rounding: str = "nearest",
) -> optax.GradientTransformationExtraArgs:
    r"""Bop, the binary optimizer (Helwegen et al., NeurIPS 2019).

    .. math::
        m_t = m_{t-1} + \gamma_t (g_t - m_{t-1}), \qquad
        \text{flip } w \text{ where } w\,m_t > \tau_t.

    The momentum :math:`m` is never reset after a flip. A weight exactly on the threshold is kept
    (Larq sets it to +1). A real-valued weight is binarized by its first update. Non-finite
    gradient elements are skipped (see `binax.transforms`).

    Args:
      threshold: :math:`\tau` >= 0 (default 1e-8, Larq's current default and the paper's).
      gamma: adaptivity rate :math:`\gamma` in (0, 1] (default 1e-4).
      state_dtype: dtype (default float32) :math:`m` is stored in (arithmetic in float32).
      rounding: ``"nearest"``, or ``"stochastic"`` with bfloat16 state (unbiased: small
        steps are not rounded away; see `binax.transforms`).

    Examples:
      >>> import jax.numpy as jnp, optax, binax
      >>> w = {"kernel": jnp.array([1.0, -1.0, 1.0])}
      >>> tx = binax.bop(threshold=0.0, gamma=1.0)
      >>> state = tx.init(w)
      >>> u, state = tx.update({"kernel": jnp.array([0.5, 0.5, -0.5])}, state, w)
      >>> optax.apply_updates(w, u)["kernel"]
      Array([-1., -1.,  1.], dtype=float32)

    References:
      Helwegen et al., `Latent Weights Do Not Exist: Rethinking Binarized Neural Network
      Optimization <https://arxiv.org/abs/1906.02107>`_, 2019.
    """
    _checks.check_rate("gamma", gamma)
    return optax.chain(
        T.scale_by_ema(gamma, state_dtype=state_dtype, rounding=rounding),
        T.flip_by_threshold(threshold),
    )


def bop2nd_order(
    threshold: ScalarOrSchedule = 1e-6,
    gamma: ScalarOrSchedule = 1e-6,
    sigma: ScalarOrSchedule = 1e-2,
    bias_correction: str | None = None,
    eps: float = 1e-10,
    *,
    state_dtype: Any = None,
    rounding: str = "nearest",
) -> optax.GradientTransformationExtraArgs:
    r"""Bop2ndOrder: Bop on the ratio of first- and second-moment EMAs.

    .. math::
        s_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon), \qquad
        \text{flip } w \text{ where } w\,s_t > \tau_t,

    with :math:`m, v` EMAs of :math:`g, g^2` at rates :math:`\gamma, \sigma` and the bias
    correction chosen by ``bias_correction`` (``None``: biased, the paper's default; ``"rate"``:
    divide by the current rates, the authors' released "unbiased" code; ``"adam"``: Adam-style),
    see `binax.transforms.scale_by_moment_ratio`. Ties keep the weight; a real-valued weight is
    binarized by its first update.

    Args:
      threshold: :math:`\tau` >= 0 (default 1e-6).
      gamma: first-moment rate in (0, 1] (default 1e-6).
      sigma: second-moment rate in (0, 1] (default 1e-2).
      bias_correction: ``None``, ``"rate"`` or ``"adam"``.
      eps: :math:`\epsilon` (default 1e-10).
      state_dtype: dtype (default float32) :math:`m, v` are stored in (arithmetic in float32).
      rounding: ``"nearest"``, or ``"stochastic"`` with bfloat16 state (unbiased: small
        steps are not rounded away; see `binax.transforms`).

    References:
      Suarez-Ramirez et al., `A Bop and Beyond: A Second Order Optimizer for Binarized Neural
      Networks <https://arxiv.org/abs/2104.05124>`_, CVPR Workshops 2021.
    """
    return optax.chain(
        T.scale_by_moment_ratio(
            gamma,
            sigma,
            bias_correction=bias_correction,
            eps=eps,
            state_dtype=state_dtype,
            rounding=rounding,
        ),
        T.flip_by_threshold(threshold),
    )


def sgdat(
    learning_rate: ScalarOrSchedule = 1e-4,
    threshold: ScalarOrSchedule = 1e-7,
    momentum: float | None = None,
    nesterov: bool = False,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 0.0,
    flip_count_reset_every: int | None = None,
    *,
    state_dtype: Any = None,
    rounding: str = "nearest",
    count_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""SGDAT: SGD with an adaptive, per-weight flip threshold.

    .. math::
        a_t = a_{t-1} + \eta_t d_t, \qquad
        w \leftarrow \mathrm{sign0}(-a_t) \text{ where } |a_t| > \tau_t n + \epsilon,

    where :math:`d` is the gradient (with optional weight decay and momentum, see
    `binax.transforms.scale_by_accumulation`) and :math:`n` counts each weight's own flips. With
    :math:`n = 0` the first update sets every weight with a non-zero gradient to
    :math:`-\mathrm{sign}(g)`, as the reference does.

    ``flip_count_reset_every=None`` (the default) keeps the flip counts (and the momentum buffer)
    for the whole run. The reference training script rebuilds its optimizer every epoch, which
    zeroes both (not the accumulator) every epoch: pass the number of steps per epoch to get that.
    The published table used ``threshold=1e-6`` and ``eps=1e-8`` (1e-9 with momentum). Weight
    decay uses the actual weight (the reference sees 0 at its first update). A real-valued weight
    is binarized by its first update.

    Args:
      learning_rate: :math:`\eta` > 0 (default 1e-4).
      threshold: :math:`\tau` >= 0 (default 1e-7).
      momentum: >= 0, or ``None`` (the default): no momentum and no momentum buffer (also for
        a Python 0). Under `optax.inject_hyperparams` keep ``None`` (as for ``optax.sgd``): an
        injected number becomes an array, and an array keeps a buffer.
      nesterov: Nesterov momentum.
      dampening: in [0, 1].
      weight_decay: >= 0.
      eps: :math:`\epsilon` >= 0 added to the threshold.
      flip_count_reset_every: ``None`` or a number of steps.
      state_dtype: dtype (default float32) the accumulator and momentum buffer are stored in
        (arithmetic in float32).
      rounding: ``"nearest"``, or ``"stochastic"`` with bfloat16 state (unbiased: small
        steps are not rounded away; see `binax.transforms`).
      count_dtype: integer dtype of the flip counts (int8/int16 save memory; counts saturate).

    References:
      Gu Shan et al., `SGDAT: An optimization method for binary neural networks
      <https://doi.org/10.1016/j.neucom.2023.126431>`_, Neurocomputing 555, 2023.
    """
    _checks.check_reset_every("flip_count_reset_every", flip_count_reset_every)
    return optax.chain(
        T.scale_by_accumulation(
            learning_rate,
            momentum=momentum,
            nesterov=nesterov,
            dampening=dampening,
            weight_decay=weight_decay,
            reset_every=flip_count_reset_every,
            state_dtype=state_dtype,
            rounding=rounding,
        ),
        T.flip_by_adaptive_threshold(
            threshold, eps=eps, reset_every=flip_count_reset_every, count_dtype=count_dtype
        ),
    )


def diode(
    learning_rate: ScalarOrSchedule = 1e-4,
    b1: float = 0.99,
    b2: float = 0.9999,
    init_scale: float = 1e-3,
    seed: int | jax.Array = 0,
    *,
    state_dtype: Any = None,
    rounding: str = "nearest",
) -> optax.GradientTransformationExtraArgs:
    r"""Diode: stochastic sign descent for binary weights.

    .. math::
        m_1 &= m_1 + (1 - \beta_1)(g - m_1) \\
        m_2 &= m_2 + (1 - \beta_2)(\eta_t\,\mathrm{sign}(m_1) - m_2) \\
        w &= -1 \text{ where } m_2 > 0, \text{ else } +1

    with :math:`m_2` started at :math:`-\mathrm{sign0}(w)\,U[0,1)\,s_0` (``init_scale``, drawn
    from ``seed`` in ``init``): :math:`-m_2` is a bounded latent weight, so ``learning_rate``
    matters only relative to ``init_scale``. At the defaults a weight needs thousands of
    consistent steps to flip. A real-valued weight is binarized by its first update. The authors'
    real-valued branch is AdamW-like with the same rate and betas: use ``optax.adamw`` in the
    other branch of `binax.partition`.

    Args:
      learning_rate: :math:`\eta` > 0 (default 1e-4).
      b1: gradient EMA decay in [0, 1) (default 0.99).
      b2: sign EMA decay in [0, 1) (default 0.9999).
      init_scale: scale of the random initial state (default 1e-3).
      seed: int or PRNG key for the initial state.
      state_dtype: dtype (default float32) :math:`m_1, m_2` are stored in (arithmetic in float32).
      rounding: ``"nearest"``, or ``"stochastic"`` with bfloat16 state (unbiased: small
        steps are not rounded away; see `binax.transforms`).

    References:
      Guo, Guo, Meinel and Yang, "Stochastic Sign Descent", ECCV 2024 (reference code:
      GreenBitAI/bitorch-engine, ``bitorch_engine/optim/diode_beta.py``).
    """
    _checks.check_beta("b1", b1)
    return optax.chain(
        T.scale_by_ema(T.one_minus(b1), state_dtype=state_dtype, rounding=rounding, seed=seed),
        T.scale_by_sign_ema(
            learning_rate,
            b2,
            init_scale=init_scale,
            seed=seed,
            state_dtype=state_dtype,
            rounding=rounding,
        ),
        T.flip_to_descent_sign(),
    )


def cema(
    gamma: ScalarOrSchedule,
    alpha: ScalarOrSchedule,
    *,
    state_dtype: Any = None,
    rounding: str = "nearest",
) -> optax.GradientTransformationExtraArgs:
    r"""CEMA: Bop on a cascade of two EMAs (Quist, Li and van Gemert, ICLR 2023).

    .. math::
        m_t = m_{t-1} + \gamma_t (g_t - m_{t-1}), \qquad
        i_t = i_{t-1} + \alpha_t (m_t - i_{t-1}), \qquad
        \text{flip } w \text{ where } w\,i_t > 0.

    :math:`i` plays the role of a latent weight's inertia. The paper publishes no defaults, so
    both rates are required. Weights should start binary (a real-valued weight is binarized by
    its first update).

    Args:
      gamma: gradient EMA rate in (0, 1].
      alpha: inertia EMA rate in (0, 1].
      state_dtype: dtype (default float32) :math:`m, i` are stored in (arithmetic in float32).
      rounding: ``"nearest"``, or ``"stochastic"`` with bfloat16 state (unbiased: small
        steps are not rounded away; see `binax.transforms`).

    References:
      Quist, Li and van Gemert, `Understanding weight-magnitude hyperparameters in training
      binary networks <https://openreview.net/forum?id=uBKBoix9NXa>`_, ICLR 2023.
    """
    _checks.check_rate("gamma", gamma)
    _checks.check_rate("alpha", alpha)
    return optax.chain(
        T.scale_by_ema(gamma, state_dtype=state_dtype, rounding=rounding, seed=0),
        T.scale_by_ema(alpha, state_dtype=state_dtype, rounding=rounding, seed=1),
        T.flip_by_threshold(0.0),
    )
