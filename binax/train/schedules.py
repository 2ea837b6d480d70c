"""A small text language for hyperparameter schedules, turned into Optax schedules.

A hyperparameter given on the command line (or in a `binax.train.Config`) is a number or a
string in one of these forms:

=============================  ======================================================
``0.01``                       constant
``constant:0.01``              constant
``linear:START,END``           linear from START (first step) to END (last step)
``cosine:START[,END]``         cosine decay from START to END (default 0) over the run
``step:START,FACTOR,EVERY``    START, multiplied by FACTOR every EVERY epochs
=============================  ======================================================

Examples: ``--gamma step:1e-4,0.1,100`` is the Bop paper's CIFAR-10 schedule (gamma 1e-4
multiplied by 0.1 every 100 epochs); ``--lr linear:2.5e-3,5e-6`` its ImageNet Adam schedule.
Durations are in epochs, so a schedule means the same thing whatever the batch size. The
schedules are Optax schedules evaluated at the optimizer's step count, as every binax
optimizer does.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import optax

#: The kinds of schedule: their forms and how many numbers each takes.
FORMS = {
    "constant": ("constant:VALUE", (1,)),
    "linear": ("linear:START,END", (2,)),
    "cosine": ("cosine:START[,END]", (1, 2)),
    "step": ("step:START,FACTOR,EVERY_EPOCHS", (3,)),
}


class Schedule(NamedTuple):
    """A parsed schedule: its kind and its numbers (see the module docstring)."""

    kind: str
    values: tuple[float, ...]

    def build(self, steps_per_epoch: int, total_steps: int) -> float | optax.Schedule:
        """A float (constant) or an `optax.Schedule` over a run of ``total_steps`` optimizer
        steps (``linear`` and ``cosine`` span it) of ``steps_per_epoch`` per epoch (``step``
        counts epochs)."""
        if self.kind == "constant":
            return self.values[0]
        span = max(total_steps - 1, 1)
        if self.kind == "linear":
            return optax.linear_schedule(*self.values, transition_steps=span)
        if self.kind == "cosine":
            start, end = self.values
            return optax.cosine_decay_schedule(start, decay_steps=span, alpha=end / start)
        start, factor, every = self.values
        return optax.exponential_decay(
            start,
            transition_steps=max(int(every) * steps_per_epoch, 1),
            decay_rate=factor,
            staircase=True,
        )

    def value(self, count: int, steps_per_epoch: int, total_steps: int) -> float:
        """The value at optimizer step ``count`` (0-based), as a float."""
        s = self.build(steps_per_epoch, total_steps)
        return float(s(count)) if callable(s) else float(s)


def _number(text: str, spec: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise ValueError(f"schedule {spec!r}: {text!r} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"schedule {spec!r}: {text!r} is not a finite number")
    return x


def parse(spec: float | int | str | Schedule) -> Schedule:
    """Parses a number or a schedule string; raises ValueError saying what is expected."""
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Schedule("constant", (_number(str(spec), str(spec)),))
    if not isinstance(spec, str):
        raise ValueError(f"expected a number or a schedule string, got {spec!r}")
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    if not sep:
        return Schedule("constant", (_number(text, spec),))
    kind = kind.strip().lower()
    values = tuple(_number(v.strip(), spec) for v in rest.split(",")) if rest.strip() else ()
    if kind not in FORMS:
        raise ValueError(
            f"schedule {spec!r}: unknown kind {kind!r}; valid kinds: {', '.join(FORMS)}"
        )
    form, counts = FORMS[kind]
    if len(values) not in counts:
        raise ValueError(f"schedule {spec!r}: expected {form}")
    if kind == "cosine" and len(values) == 1:
        values = (values[0], 0.0)
    if kind == "cosine" and values[0] <= 0:
        raise ValueError(f"schedule {spec!r}: cosine needs START > 0")
    if kind == "step" and (values[2] <= 0 or values[2] != int(values[2])):
        raise ValueError(f"schedule {spec!r}: EVERY_EPOCHS must be a positive integer")
    return Schedule(kind, values)


def build(spec: float | str, steps_per_epoch: int, total_steps: int) -> float | optax.Schedule:
    """``parse(spec).build(steps_per_epoch, total_steps)``."""
    return parse(spec).build(steps_per_epoch, total_steps)
