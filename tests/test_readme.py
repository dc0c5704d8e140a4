"""The documentation's Python code runs: every ```python block of README.md and docs/*.md is executed.

Blocks of one file run in order in one namespace (a later block may use an earlier block's names), in a fresh
working folder with one intra-op thread. Markers, each an HTML comment (invisible on the rendered page) on the line
right before a block's opening fence:

- ``<!-- test: gpu -->``: needs a CUDA GPU; skipped, with the reason, where CUDA cannot run;
- ``<!-- test: data REASON -->``: needs real data (e.g. MNIST files); skipped with REASON;
- ``<!-- test: skip REASON -->``: not run (say why);
- ``<!-- test: setup`` ... ``-->``: hidden code, a comment of its own whose body runs (in order, like a block) before
  the blocks after it, e.g. to make the small model that ``vaefast.load_model("runs/beta4")`` then loads
  (``__file__`` is the Markdown file's path, e.g. to run a script of the repository).

A block that needs a name from a skipped block is a documentation bug: give it what it needs in a setup comment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import CUDA_SKIP_REASON, cuda_usable

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*test:\s*(gpu|data|skip)\b\s*(.*?)\s*-->$")
SETUP = re.compile(r"^<!--\s*test:\s*setup\s*$")


@dataclass(frozen=True)
class Block:
    """One piece of code to run: a fenced block or a hidden setup comment.

    Attributes:
        path: the Markdown file.
        line: the line of its first code line (1-based).
        code: the code.
        marker: ``None``, ``"gpu"``, ``"data"`` or ``"skip"``.
        reason: the marker's reason.
        setup: whether it is a hidden setup comment.
    """

    path: Path
    line: int
    code: str
    marker: str | None = None
    reason: str = ""
    setup: bool = False

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}" + (":setup" if self.setup else "")


def blocks(path: Path) -> list[Block]:
    """The code of ``path``: its ```python blocks (with their markers) and its setup comments, in order."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        stripped = lines[i].strip()
        if SETUP.match(stripped):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->")
            out.append(Block(path, i + 2, "\n".join(lines[i + 1 : end]), setup=True))
            i = end + 1
            continue
        if stripped == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            found = MARKER.match(previous)
            marker, reason = (found.group(1), found.group(2)) if found else (None, "")
            out.append(Block(path, i + 2, "\n".join(lines[i + 1 : end]), marker, reason))
            i = end + 1
            continue
        i += 1
    return out


BLOCKS = [b for path in DOCS for b in blocks(path)]


def test_the_readme_has_code_to_run() -> None:
    assert any(b.path.name == "README.md" and not b.setup for b in BLOCKS)


@pytest.fixture(scope="module")
def namespaces(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, tuple[dict, Path]]:
    """One namespace and one working folder per documentation file."""
    return {
        path: ({"__name__": f"doc:{path.name}", "__file__": str(path)}, tmp_path_factory.mktemp(path.stem))
        for path in DOCS
    }


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_documented_code_runs(block: Block, namespaces, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.marker == "gpu" and not cuda_usable():
        pytest.skip(CUDA_SKIP_REASON)
    if block.marker in ("data", "skip"):
        pytest.skip(block.reason or f"marked '{block.marker}' without a reason")
    namespace, folder = namespaces[block.path]
    monkeypatch.chdir(folder)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile("\n" * (block.line - 1) + block.code, str(block.path), "exec"), namespace)  # noqa: S102
    finally:
        torch.set_num_threads(threads)
