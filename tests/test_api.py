"""The README's "Python API" lines, run exactly as written (in a folder laid out as after `make demo`)."""

import os
import re
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_api_lines_run_as_documented(tmp_path, monkeypatch):
    from arrag.demo.database import build_demo_retriever
    from arrag.demo.pipeline import ASSETS

    block = re.search(r"<!-- api -->\n```python\n(.*?)```\n<!-- /api -->", (ROOT / "README.md").read_text(), re.S)
    assert block, "README has no Python API block"
    os.symlink(ROOT / "arrag", tmp_path / "arrag")  # the demo models at their documented path
    build_demo_retriever(ASSETS / "tail" / "base", tmp_path / "data" / "retriever" / "tail", 24, 64, progress=False,
                         world="tail", shape="2hop")  # as `make demo` builds it
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block.group(1), "README.md (Python API)", "exec"), scope)  # noqa: S102 - the documented lines
    assert scope["images"].shape == (4, 64, 64, 3) and scope["images"].dtype == np.uint8
    assert scope["more"].shape == (2, 64, 64, 3) and scope["once"].shape == (1, 64, 64, 3)
    assert scope["record"]["method"] == "daid" and scope["record"]["daid_k"] == 256
    again = scope["daid"](["a red houndstooth"], parallel_size=4, seed=0)
    np.testing.assert_array_equal(again, scope["images"])  # the same seed, the same images
    assert not np.array_equal(scope["same_seed"], scope["images"])  # FAiD is another model
