"""docs/backbone.md's examples run, in order, in an empty folder: its Python blocks in one
namespace, its `vggnet ...` command lines through the command line's own entry point (the
lpips wheel is linked in where its bash block downloads it)."""

import re
import shlex
import sys
from pathlib import Path

from vggnet.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "backbone.md"
LPIPS_WHEEL = Path(sys.prefix) / "wheels" / "lpips-0.1.4-py3-none-any.whl"


def commands(block: str) -> list[list[str]]:
    """The `vggnet` command lines of a bash block (continuations joined), as argv lists."""
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line)[1:] for line in lines if line.startswith("vggnet ")]


def test_backbone_doc_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```(python|bash)\n(.*?)```", DOC.read_text(), flags=re.S)
    assert [k for k, _ in blocks].count("python") == 9
    assert LPIPS_WHEEL.is_file(), f"{LPIPS_WHEEL} is missing: `make test` downloads it"
    (tmp_path / LPIPS_WHEEL.name).symlink_to(LPIPS_WHEEL)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    ran = []
    for i, (kind, code) in enumerate(blocks):
        if kind == "python":
            exec(compile(code, f"{DOC.name} block {i + 1}", "exec"), namespace)
            continue
        for argv in commands(code):
            assert main(argv + ["--no-progress"]) == 0, argv
            ran.append(argv[0] if argv[0] != "data" else "data check")
    assert ran == ["stylize", "explain", "features", "retrieve", "data check", "finetune"]
    assert (tmp_path / "stylized.png").is_file() and (tmp_path / "stylized-cli.png").is_file()
    explained = sorted(p.name for p in (tmp_path / "explained").iterdir())
    assert explained == ["photo.png", "photo.safetensors"]
    assert sorted(p.name for p in (tmp_path / "explained-cli").iterdir()) == [
        "blue.png", "blue.safetensors", "photo.png", "photo.safetensors", "red.png",
        "red.safetensors"]
    for folder in ("retrieved", "retrieved-cli"):
        names = {p.name for p in (tmp_path / folder).iterdir()}
        assert names == {"topk.csv", "contact_sheet.png"}
    assert (tmp_path / "descriptors.safetensors").is_file()
    assert (tmp_path / "runs" / "pets" / "evaluation" / "results.json").is_file()
    assert namespace["d"].shape == (4,) and namespace["cams"].shape == (2, 2, 2)
    out = capsys.readouterr().out.splitlines()
    assert "44 6" in out and "1 ['centre', 'gradcam relu4_3', 'gradcam relu5_3', 'saliency']" \
        in out
    assert out[-2:] == ["1.0 fc7", "dense"]
