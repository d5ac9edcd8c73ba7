"""The README's notebook snippet runs as written (offline: the tiny backbone, a bundled image)."""

import re

import torch
from helpers import ROOT

from spar.data import SAMPLE_IMAGES


def test_readme_notebook_snippet_runs_offline():
    readme = (ROOT / "README.md").read_text()
    (snippet,) = re.findall(r"## In a notebook\n\n```python\n(.*?)```", readme, re.S)
    code = snippet.replace('create_backbone("maskclip")', 'create_backbone("tiny")').replace(
        '"street.jpg"', repr(str(SAMPLE_IMAGES / "astronaut.jpg"))
    )
    assert code != snippet
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the project's own README
    x, student, teacher, mask = (scope[name] for name in ("x", "student", "teacher", "mask"))
    height, width = x.shape[-2:]
    assert max(height, width) <= 2048 and min(height, width) <= 672
    assert student.shape == teacher.shape == (1, 64, -(-height // 16), -(-width // 16))
    assert mask.shape == (height, width) and mask.dtype == torch.long
    assert int(mask.max()) < 5
