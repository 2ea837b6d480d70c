import os
import subprocess
import sys

import pytest

from binax import _malloc


@pytest.mark.parametrize(
    "environ, glibc, thp, expected",
    [
        ({}, (2, 36), "madvise", "glibc.malloc.hugetlb=1"),
        ({}, (2, 35), "always", "glibc.malloc.hugetlb=1"),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
            (2, 36),
            "madvise",
            "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
        ),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", None),  # user's choice
        ({"BINAX_HUGE_PAGES": "0"}, (2, 36), "madvise", None),
        ({}, (2, 34), "madvise", None),  # the tunable does not exist yet
        ({}, (), "madvise", None),  # musl or unknown C library
        ({}, (2, 36), "never", None),
        ({}, (2, 36), "", None),  # no transparent huge pages in this kernel
    ],
)
def test_huge_pages_env(environ, glibc, thp, expected):
    env = _malloc.huge_pages_env(dict(environ, KEEP="x"), glibc, thp)
    if expected is None:
        assert env is None
    else:
        assert env["GLIBC_TUNABLES"] == expected
        assert env["KEEP"] == "x"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")
def test_binax_train_restarts_itself_with_the_tunable():
    """The process is replaced by ``python -m binax.train`` with the same arguments."""
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "BINAX_HUGE_PAGES")}
    probe = (
        "import os, sys, binax._malloc as m;"
        "m.restart_with_huge_pages(['-m', 'binax.train', *sys.argv[1:]]);"
        "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])"
    )
    # The probe restarts as `python -m binax.train --help`: the real command prints its help.
    out = subprocess.run(
        [sys.executable, "-c", probe, "--help"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    expected = _malloc.huge_pages_env(env)
    if expected is None:  # this machine cannot: nothing restarts, the probe prints on
        assert out.stdout.startswith("None ['--help']")
    else:
        assert out.stdout.startswith("usage: binax-train")
