"""Running binax's commands with glibc's malloc on transparent huge pages.

XLA:CPU allocates the temporary buffers of a compiled program (activations, gradients, the
patches of the kernel gradient) anew on every call. glibc serves blocks that large with
``mmap``, so every training step first-touches hundreds of MB of fresh 4 KiB pages: 83,000
page faults per step for BinaryNet x0.5 at batch 256 on a 2-core Xeon. The glibc tunable
``glibc.malloc.hugetlb=1`` (glibc 2.35 or later) makes malloc ask the kernel for transparent
huge pages (2 MiB) instead: under 2,500 faults, and the step 3-8% faster on the quiet machine
in session 5, 9-19% in session 8 (BENCHMARKS.md section 7). glibc reads its tunables only when a
process starts, so a command that wants them re-executes itself once with ``GLIBC_TUNABLES``
extended (`restart_with_huge_pages`). ``BINAX_HUGE_PAGES=0`` turns this off. From Python (a
notebook, your own script) start the interpreter with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return ()
    return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())


def _thp_mode() -> str:
    """The kernel's transparent-huge-page mode (``always``/``madvise``/``never``), or ``''``."""
    try:
        with open(_THP) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def huge_pages_env(
    environ: dict[str, str], glibc: tuple[int, ...] | None = None, thp: str | None = None
) -> dict[str, str] | None:
    """The environment to restart in with ``glibc.malloc.hugetlb=1``, or ``None`` not to.

    ``None`` when ``BINAX_HUGE_PAGES`` is ``0``, when ``GLIBC_TUNABLES`` already sets
    ``glibc.malloc.hugetlb``, when the C library is not glibc 2.35 or later, or when the kernel
    has transparent huge pages off. ``glibc`` and ``thp`` default to this machine's.
    """
    if environ.get("BINAX_HUGE_PAGES", "1") == "0":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    glibc = _glibc_version() if glibc is None else glibc
    thp = _thp_mode() if thp is None else thp
    if glibc < (2, 35) or thp not in ("always", "madvise"):
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{TUNABLE}" if tunables else TUNABLE}


def restart_with_huge_pages(args: list[str]) -> None:
    """Re-executes ``python *args`` with huge pages when `huge_pages_env` says so.

    Returns without doing anything otherwise (not Linux, already set, turned off).
    """
    if not sys.platform.startswith("linux"):
        return
    env = huge_pages_env(dict(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], env)
