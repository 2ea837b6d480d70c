"""Every notebook in notebooks/ runs top to bottom, and the repository keeps them clean.

The notebooks are executed with nbclient in a fresh kernel, in ``notebooks/`` and with
``BINAX_NOTEBOOK_QUICK=1`` (each notebook then cuts its epochs and steps to a smoke-test size).
A cell that raises fails the test.

Kernel: with ipykernel installed, jupyter_client finds a ``python3`` kernel by itself even in a
fresh environment with no kernelspec directory (it falls back to ipykernel's built-in spec, run
with ``sys.executable``), so no ``python -m ipykernel install`` step is needed. The test still
writes its own ``python3`` spec for this interpreter to a temporary directory and uses only
that one, so that a ``python3`` kernelspec installed for another interpreter (for example in
``~/.local/share/jupyter/kernels``, which takes precedence) cannot run the notebooks instead.
"""

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {
    "01_quickstart",
    "02_compare_optimizers",
    "03_custom_optimizer",
    "04_nnx_binary_cnn",
    "05_deploy",
}
COLAB = "https://colab.research.google.com/github/{org}/binax/blob/main/notebooks/{name}.ipynb"
CELL_TIMEOUT = 300  # seconds per cell; the quick runs take a few seconds per cell
KERNEL_DEVICES = 2  # simulated CPU devices in the kernel, so the mesh in 04 has two
CHECK_CELL = f"""
import os, jax
assert QUICK and os.environ["BINAX_NOTEBOOK_QUICK"] == "1"
assert jax.device_count() == {KERNEL_DEVICES}, jax.devices()
print("kernel settings ok")
"""


def _ids(paths):
    return [p.stem for p in paths]


@pytest.fixture(scope="session")  # not "module": conftest.py would keep the notebooks in one worker
def kernel_dir(tmp_path_factory):
    """A directory holding a ``python3`` kernelspec that runs this interpreter."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / "python3"
    spec.mkdir()
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (binax tests)",
                "language": "python",
            }
        )
    )
    return root


def _kernel_env():
    env = dict(os.environ)
    env.update(
        BINAX_NOTEBOOK_QUICK="1",
        JAX_PLATFORMS="cpu",
        JAX_NUM_CPU_DEVICES=str(KERNEL_DEVICES),
        MPLBACKEND="agg",
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    # The test process may simulate more devices through XLA_FLAGS; the kernel uses its own.
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    # The quick runs spend most of their time compiling: without LLVM optimisation XLA
    # compiles about twice as fast (what is computed does not change, only how fast).
    env["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    return env


def test_all_notebooks_present():
    assert {p.stem for p in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_is_clean(path):
    """No outputs or execution counts; valid; a Colab badge; an install cell that is guarded."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} has outputs: clear them before committing"
            assert cell.execution_count is None, f"cell {i} has an execution count"
    first = nb.cells[0]
    assert first.cell_type == "markdown"
    badge = COLAB.format(org=r"[\w.-]+", name=re.escape(path.stem))
    assert re.search(badge, first.source), "the first cell must link to this notebook on Colab"
    install = nb.cells[1].source
    assert "except ImportError:" in install and "%pip install" in install, (
        "the second cell must install binax only when it cannot be imported"
    )
    assert any("BINAX_NOTEBOOK_QUICK" in c.source for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, kernel_dir):
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(
        kernel_name="python3",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_dir)]),
    )
    assert km.kernel_spec.argv[0] == sys.executable
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    # A last cell, added here only, checks that the kernel got the test's settings.
    nb.cells.append(nbformat.v4.new_code_cell(CHECK_CELL))
    client.execute(env=_kernel_env())  # raises CellExecutionError naming the failing cell
    ran = [c for c in nb.cells if c.cell_type == "code"]
    assert ran and all(c.execution_count for c in ran), "not every code cell ran"
    errors = [o for c in ran for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert "".join(o.get("text", "") for o in ran[-1].outputs).strip() == "kernel settings ok"
