"""The cost of ``import binax`` against ``import optax``, each in a fresh interpreter.

    python benchmarks/import_time.py [--rounds 11] [--before DIR]

Candidates, interleaved in rounds (so that other load on the machine cancels in the ratios):
``import optax``, ``import binax``, ``import binax.nn`` (what loads Flax), and with ``--before
DIR`` ``import binax`` from another copy of the package (e.g. ``git archive <commit> binax | tar
-x -C DIR``). Prints the CPU model, the median wall time of each and its ratio to optax's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _common import cpu_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--before", metavar="DIR", help="a directory holding another binax/")
    args = p.parse_args()
    cands = {
        "import optax": (REPO, "import optax"),
        "import binax": (REPO, "import binax"),
        "import binax.nn": (REPO, "import binax.nn"),
    }
    if args.before:
        cands["import binax (--before)"] = (os.path.abspath(args.before), "import binax")
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(args.rounds):
        for name, (path, code) in cands.items():
            env = dict(os.environ, PYTHONPATH=path)
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], env=env, cwd=path, check=True)
            times[name].append(time.perf_counter() - t)
    print(f"CPU: {cpu_model()}; {args.rounds} interleaved rounds, wall time of the interpreter")
    base = statistics.median(times["import optax"])
    for name, v in times.items():
        m = statistics.median(v)
        print(f"  {name:<26} median {m:7.3f} s   x optax {m / base:.2f}")


if __name__ == "__main__":
    main()
