"""The README's Python quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_python_quick_start_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python block"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    out = capsys.readouterr().out
    assert "ppl.wikitext2.s256.w8" in out
    assert namespace["report"].records and namespace["result"].metrics[0].value > 1
