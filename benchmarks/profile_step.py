"""Where a training step's time goes: `jax.profiler` over binax's jitted step, summed by op kind.

Builds BinaryNet (``--width``, 28x28x1 or ``--input``), Bop + Adam, binax's training step
(`binax.train.make_program`), runs ``--warmup`` steps, then traces ``--steps`` steps with
`jax.profiler` (a Perfetto trace) and prints the time of every XLA operation the CPU runtime
executed, summed per kind (the HLO name without its number: ``ynn_fusion`` are the
convolutions and matrix products XLA hands to YNNPACK, ``convert_bitcast_fusion`` /
``pad_slice_fusion`` / ``concatenate`` the patches of the kernel gradient, ...). With
``--dump DIR`` XLA also writes the optimized HLO there (``XLA_FLAGS=--xla_dump_to``), to look
up what a name computes. Times are wall time of each operation, so a loaded machine inflates
them all; compare shares, not totals.

Usage::

    python benchmarks/profile_step.py                                # default layers
    python benchmarks/profile_step.py --kernel-grad xla --arithmetic float
    python benchmarks/profile_step.py --dump /tmp/hlo --top 40
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=float, default=0.25)
    p.add_argument("--input", default="28x28x1")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--arithmetic", default="auto")
    p.add_argument("--kernel-grad", default="auto")
    p.add_argument("--backward-dtype", default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--dump", default=None, help="directory for XLA's HLO dumps")
    args = p.parse_args(argv)
    if args.dump:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={args.dump} --xla_dump_hlo_as_text"
        )

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common

    shape = tuple(int(s) for s in args.input.split("x"))
    step = _common.binarynet_step(
        args.width,
        shape,
        args.batch_size,
        arithmetic=args.arithmetic,
        kernel_grad=args.kernel_grad,
        backward_dtype=args.backward_dtype,
    )
    for _ in range(1 + args.warmup):
        step()
    by_kind = _common.op_times(step, args.steps)
    total = sum(by_kind.values())
    print(f"Command: `{_common.command()}`\n{_common.machine()}\n")
    print(
        f"BinaryNet x{args.width:g} {args.input}, batch {args.batch_size}, arithmetic="
        f"{args.arithmetic}, kernel_grad={args.kernel_grad}, backward_dtype={args.backward_dtype}"
        f": {total:.0f} ms of XLA operations per step\n"
    )
    rows = [(k, f"{v:.1f}", f"{100 * v / total:.1f}") for k, v in list(by_kind.items())[: args.top]]
    print(_common.md_table(("operation kind", "ms per step", "%"), rows))


if __name__ == "__main__":
    main()
