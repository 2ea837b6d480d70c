"""binax's training step with glibc's malloc as is and on transparent huge pages.

glibc reads ``GLIBC_TUNABLES`` only at start-up, so each setting runs in its own process: one
with the variable as the environment has it minus ``glibc.malloc.hugetlb`` ("plain"), one with
``glibc.malloc.hugetlb=1`` (what ``binax-train`` restarts itself with, `binax._malloc`),
alternating ``--pairs`` times. Each process builds BinaryNet (``--width``, 28x28x1, batch 256,
Bop + Adam; `binax.train.make_program`), takes 3 untimed steps, then ``--steps`` timed ones,
and reports the median wall time, CPU time and minor page faults per step.

Usage::

    python benchmarks/huge_pages.py
    python benchmarks/huge_pages.py --width 0.25 --pairs 3
    python benchmarks/huge_pages.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def child(width: float, steps: int) -> dict:
    """Runs in the measured process: medians per step of wall s, CPU s and minor faults."""
    import resource
    import time

    import numpy as np

    step = _common.binarynet_step(width)
    rows = []
    for i in range(3 + steps):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        if i >= 3:
            rows.append(
                (time.perf_counter() - t0, time.process_time() - c0, r1.ru_minflt - r0.ru_minflt)
            )
    wall, cpu, faults = (float(np.median(c)) for c in np.transpose(rows))
    return {"wall_s": wall, "cpu_s": cpu, "minor_faults": faults}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--pairs", type=int, default=2, help="processes per setting, alternating")
    p.add_argument("--quick", action="store_true", help="width 1/16, 2 steps, 1 pair")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.width, args.steps, args.pairs = 0.0625, 2, 1
    if args.child:
        print(json.dumps(child(args.width, args.steps)))
        return 0
    from binax._malloc import TUNABLE

    others = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t]
    others = [t for t in others if not t.startswith("glibc.malloc.hugetlb")]
    settings = {"plain": ":".join(others), "huge pages": ":".join([*others, TUNABLE])}
    print(f"Command: `{_common.command()}`\n{_common.machine()}\n")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--width={args.width}"]
    cmd.append(f"--steps={args.steps}")
    rows = []
    for i in range(args.pairs):
        for name, tunables in settings.items():
            env = {**os.environ, "GLIBC_TUNABLES": tunables}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(
                (
                    str(i + 1),
                    name,
                    f"{r['wall_s']:.3f}",
                    f"{r['cpu_s']:.3f}",
                    f"{r['minor_faults']:.0f}",
                )
            )
            print(" | ".join(rows[-1]), flush=True)
    print(
        f"\nBinaryNet x{args.width:g} 28x28x1, batch 256, "
        f"medians of {args.steps} steps per process:\n"
    )
    print(_common.md_table(("pair", "malloc", "step s", "CPU s", "minor faults per step"), rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
