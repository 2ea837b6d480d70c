"""Hyperparameter schedules: a number or a string of one of the `FORMS` (``linear:1e-2,1e-4``),
parsed once into a `Schedule`, which builds an Optax schedule for a run. Durations are in
epochs, so a schedule means the same whatever the batch size (docs/training.md, "Schedules")."""

from __future__ import annotations

import math
from typing import NamedTuple

import optax

#: The kinds of schedule: their form, how many numbers each takes, and what it computes.
FORMS = {
    "constant": ("constant:VALUE", (1,), "VALUE throughout (as a plain number)"),
    "linear": ("linear:START,END", (2,), "linear from START (first step) to END (last)"),
    "cosine": ("cosine:START[,END]", (1, 2), "cosine decay from START to END (default 0)"),
    "step": ("step:START,FACTOR,EVERY_EPOCHS", (3,), "START, times FACTOR every EVERY_EPOCHS"),
}


class Schedule(NamedTuple):
    """A parsed schedule: its kind and its numbers (see `FORMS`)."""

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
        steps = max(int(every) * steps_per_epoch, 1)  # transition steps: EVERY_EPOCHS
        return optax.exponential_decay(start, steps, factor, staircase=True)

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
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise ValueError(f"expected a number or a schedule string, got {spec!r}")
    text = str(spec).strip()
    kind, sep, rest = text.partition(":")
    if not sep:  # a number, or a string without a kind
        return Schedule("constant", (_number(text, str(spec)),))
    kind = kind.strip().lower()
    values = tuple(_number(v.strip(), spec) for v in rest.split(",")) if rest.strip() else ()
    if kind not in FORMS:
        raise ValueError(
            f"schedule {spec!r}: unknown kind {kind!r}; valid kinds: {', '.join(FORMS)}"
        )
    form, counts, _ = FORMS[kind]
    if len(values) not in counts:
        raise ValueError(f"schedule {spec!r}: expected {form}")
    if kind == "cosine" and len(values) == 1:
        values = (values[0], 0.0)
    if kind == "cosine" and values[0] <= 0:
        raise ValueError(f"schedule {spec!r}: cosine needs START > 0")
    if kind == "step" and (values[2] <= 0 or values[2] != int(values[2])):
        raise ValueError(f"schedule {spec!r}: EVERY_EPOCHS must be a positive integer")
    return Schedule(kind, values)
