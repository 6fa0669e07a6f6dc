"""The code blocks of README.md and docs/*.md, as the documentation tests read them.

A block is ```python or ```bash (blocks without a language are output shown, not code). An
HTML comment on the line before a block can mark it, with the reason, e.g.
``<!-- doc-test: parse-only: needs ImageNet in /data/imagenet -->``: such a block is only
parsed (Python compiled, every `vggnet` command parsed by the command line), not run.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_BLOCK = re.compile(r"(?:<!-- doc-test: (?P<mode>[a-z-]+): (?P<reason>.+?) -->\n)?"
                    r"^```(?P<lang>[a-z]*)\n(?P<code>.*?)^```$", re.S | re.M)
MODES = ("run", "parse-only")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence
    lang: str
    code: str
    mode: str  # "run" (the default) or "parse-only"
    reason: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path, lang: str | None = None) -> list[Block]:
    """Every fenced code block of ``path`` with a language (or only ``lang``'s), in order."""
    text = path.read_text()
    out = []
    for m in _BLOCK.finditer(text):
        if not m["lang"] or (lang and m["lang"] != lang):
            continue
        mode = m["mode"] or "run"
        if mode not in MODES:
            raise ValueError(f"{path.name}: unknown doc-test mode {mode!r}; use one of {MODES}")
        line = text.count("\n", 0, m.start("lang")) + 1
        out.append(Block(path, line, m["lang"], m["code"], mode, m["reason"] or ""))
    return out


def commands(code: str) -> list[list[str]]:
    """The `vggnet` commands of a bash block as argument lists (without "vggnet"):
    continuation lines joined, comments dropped; `torchrun ... -m vggnet ARGS` gives ARGS.
    Other commands (make, pip) are left out."""
    out = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["vggnet"]:
            out.append(words[1:])
        elif words[:1] == ["torchrun"]:
            i = words.index("-m")
            assert words[i + 1] == "vggnet", line
            out.append(words[i + 2:])
    return out
