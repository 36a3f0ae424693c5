"""docs/lecture.md runs: its python blocks, in order and in one namespace, so the tour of the
lecture never drifts from the code (each block checks its own formula)."""

import re
from pathlib import Path

LECTURE = Path(__file__).parent.parent / "docs" / "lecture.md"
PARTS = ["前向过程", "反向过程", "训练目标", "L_simple vs w_t", "Algorithms 1 and 2", "Table 1", "多种参数化方法",
         "朗之万动力学", "流匹配", "引导"]


def test_the_lecture_covers_every_part_in_order_and_its_snippets_run(tmp_path, monkeypatch, capsys):
    text = LECTURE.read_text()
    headings = [h for h in re.findall(r"^## (.+)$", text, flags=re.M)]
    at = [next(i for i, h in enumerate(headings) if part in h) for part in PARTS]
    assert at == sorted(at), headings
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= len(PARTS)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for k, block in enumerate(blocks):
        exec(compile(block, f"docs/lecture.md block {k + 1}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "DDPM on ring8" in out and "share in component 3" in out
