"""Every Python code block of README.md and docs/*.md runs, in order, one namespace per file.

A block that needs a dataset that is not available offline, or a long run, may be skipped by
putting the line ``<!-- docs-test: skip (the reason) -->`` right above it: the reason is shown
in the test report. Keep that rare.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
SKIP = re.compile(r"<!-- docs-test: skip \((.+?)\) -->\s*$")


def python_blocks(text):
    """``(line, code, skip reason or None)`` for each fenced block whose language is python."""
    for m in FENCE.finditer(text):
        if m.group(1).lower() not in ("python", "py"):
            continue
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        yield text.count("\n", 0, m.start()) + 2, m.group(2), skip and skip.group(1)


def test_blocks_are_found():
    blocks = {f.name: list(python_blocks(f.read_text())) for f in FILES}
    assert blocks["README.md"] and blocks["optimizers.md"]
    text = "x\n<!-- docs-test: skip (needs CIFAR-10) -->\n```python\n1 / 0\n```\n```bash\nls\n```\n"
    assert list(python_blocks(text)) == [(4, "1 / 0\n", "needs CIFAR-10")]


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_python_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files (runs/, checkpoints) write here
    namespace = {"__name__": f"docs:{path.name}"}
    skipped = []
    for line, code, skip in python_blocks(path.read_text()):
        if skip:
            skipped.append(f"line {line}: {skip}")
            continue
        try:
            exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the code block at {path.name}, line {line}, fails: {e!r}") from e
    if skipped:
        pytest.skip(f"{path.name}: ran all but {len(skipped)} block(s): {'; '.join(skipped)}")
