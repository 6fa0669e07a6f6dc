"""docs/backbone.md's Python examples run, in order, in one namespace, in an empty folder
(with the lpips wheel where its bash block downloads it)."""

import re
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "backbone.md"
LPIPS_WHEEL = Path(sys.prefix) / "wheels" / "lpips-0.1.4-py3-none-any.whl"


def test_backbone_doc_examples_run(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 7
    assert LPIPS_WHEEL.is_file(), f"{LPIPS_WHEEL} is missing: `make test` downloads it"
    (tmp_path / LPIPS_WHEEL.name).symlink_to(LPIPS_WHEEL)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name} python block {i + 1}", "exec"), namespace)
    assert (tmp_path / "stylized.png").is_file()
    explained = sorted(p.name for p in (tmp_path / "explained").iterdir())
    assert explained == ["photo.png", "photo.safetensors"]
    assert {p.name for p in (tmp_path / "retrieved").iterdir()} == {"topk.csv", "contact_sheet.png"}
    assert namespace["d"].shape == (4,) and namespace["cams"].shape == (2, 2, 2)
    assert capsys.readouterr().out.splitlines()[-1] == "44 6"
