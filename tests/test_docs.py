"""Every code block of README.md and docs/*.md works as written (tests/docblocks.py reads them).

- Every `vggnet` command of every bash block parses: the command line knows each option and
  value, and its settings accept them (a `--help`-level check that runs nothing).
- Python blocks run, in order, in one namespace per file, in an empty folder (docs/backbone.md's
  Python and bash blocks: by tests/test_docs_backbone.py, which also checks what they write).
- Bash blocks run, in order, in an empty folder, on tiny generated data: each command gets the
  flags ``TINY`` lists for it appended (the last value of an option wins), so that the
  README's train command, say, trains one epoch of a narrow net on 18 images.
- A block that needs what a test cannot have (downloaded weights, ImageNet, hours) is marked
  ``<!-- doc-test: parse-only: REASON -->`` on the line before it: it is parsed, not run.
"""

from __future__ import annotations

import pytest

from docblocks import DOCS, REPO, Block, blocks, commands
from vggnet.cli import build_parser, main, settings_from_options
from vggnet.fields import resolve

# flags appended to the commands the docs run, so that they take seconds on tiny data
TINY = {
    "data make": ["--train-per-class", "6", "--val-per-class", "3", "--classes", "3",
                  "--min-side", "40", "--max-side", "60", "--no-progress"],
    "data check": ["--no-progress"],
    "train": ["--epochs", "1", "--batch-size", "6", "--width", "0.0625", "--workers", "0",
              "--stats-images", "20", "--no-progress"],
    "evaluate": ["--no-progress"],
    "info": [],
}
OWN_RUNNER = {"backbone.md"}  # its Python and bash blocks: tests/test_docs_backbone.py


def _name(argv: list[str]) -> str:
    return " ".join(argv[:2]) if argv[0] == "data" else argv[0]


def _settings(argv: list[str]):
    """The settings object ``vggnet ARGV`` would run with; SystemExit or ValueError if the
    command line or the values are wrong."""
    args = vars(build_parser(argv).parse_args(argv))
    entry = args["_run"]
    values = {k: v for k, v in args.items() if not k.startswith("_")}
    settings = settings_from_options(resolve(entry.settings), values, argv[1:])
    if argv[0] == "train" and not settings.resume:  # train's options override a preset
        from vggnet.settings import make_settings

        make_settings(settings.preset, **settings.given)
    return settings


def _all(lang: str) -> list[Block]:
    return [b for doc in DOCS for b in blocks(doc, lang)]


@pytest.mark.parametrize("block", _all("bash"), ids=lambda b: b.where)
def test_every_documented_command_parses(block, capsys):
    for argv in commands(block.code):
        try:
            _settings(argv)
        except (SystemExit, ValueError) as e:
            err = capsys.readouterr().err.strip().splitlines()[-1:] or [str(e)]
            pytest.fail(f"{block.where}: `vggnet {' '.join(argv)}` does not parse: {err[0]}")


@pytest.mark.parametrize("block", [b for b in _all("python") if b.mode == "parse-only"],
                         ids=lambda b: b.where)
def test_python_blocks_marked_parse_only_compile(block):
    compile(block.code, block.where, "exec")


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name not in OWN_RUNNER and any(
    b.mode == "run" for b in blocks(d, "python"))], ids=lambda d: d.name)
def test_python_blocks_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks(doc, "python"):
        if block.mode == "run":
            exec(compile(block.code, block.where, "exec"), namespace)


@pytest.mark.parametrize("doc", [d for d in DOCS if d.name not in OWN_RUNNER and any(
    b.mode == "run" for b in blocks(d, "bash"))], ids=lambda d: d.name)
def test_bash_blocks_run_on_tiny_data(doc, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for block in blocks(doc, "bash"):
        if block.mode != "run":
            continue
        for argv in commands(block.code):
            name = _name(argv)
            assert name in TINY, (f"{block.where}: `vggnet {name}` runs in the docs' tests: add "
                                  "its tiny flags to TINY, or mark the block parse-only")
            code = main(argv + TINY[name])
            err = capsys.readouterr().err.strip().splitlines()[-1:]
            assert code == 0, f"{block.where}: `vggnet {' '.join(argv)}` failed: {err}"


def test_the_readme_runs_and_every_block_is_read():
    """The README's own commands are among those run (not all marked away), and the marker
    syntax is what docblocks reads: a misspelt marker would leave a block unmarked."""
    readme = [b for b in blocks(REPO / "README.md") if b.mode == "run"]
    ran = [argv[0] for b in readme if b.lang == "bash" for argv in commands(b.code)]
    assert ran[:4] == ["info", "data", "train", "evaluate"]
    for doc in DOCS:
        text = doc.read_text()
        assert text.count("<!-- doc-test:") == sum(b.mode != "run" for b in blocks(doc)), doc
