"""Test setup: 8 simulated CPU devices (must happen before JAX starts its backend), and one
persistent compilation cache, also for the commands the tests start: the many small training
runs compile the same steps again and again (a hit skips XLA's compilation, nothing else).

With pytest-xdist (``-n 2``), the tests that share a module-scoped fixture of their own module
(a finished training run, say) run in one worker, so that the fixture is computed once, not
once per worker: each such test gets the mark ``xdist_group(<module>)``, and pyproject.toml's
``--dist loadgroup`` spreads every other test over the workers as ``--dist load`` does.
"""

import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "binax-tests-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the marks
def pytest_collection_modifyitems(items):
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        module = item.getparent(pytest.Module).nodeid
        defs = [d for ds in info.name2fixturedefs.values() for d in ds]
        if any(d.scope == "module" and d.baseid == module for d in defs):
            item.add_marker(pytest.mark.xdist_group(module))
