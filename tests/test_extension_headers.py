"""Every header an extension's sources include (transitively, `#include "..."` under csrc/) is in its
`headers` list in sparse_attn/_build/extensions.py: the list keys the JIT build folder, so a header
missing from it can change without the extension being rebuilt (a stale kernel that still loads).
prefetch.h and score_tree.h were missing until 2026-12-02."""
import re
from pathlib import Path

import pytest

from sparse_attn._build.extensions import EXTENSIONS

ROOT = Path(__file__).resolve().parents[1] / "csrc"
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def _included(sources):
    seen, todo = set(), list(sources)
    while todo:
        path = ROOT / todo.pop()
        for h in INCLUDE.findall(path.read_text()):
            if h not in seen and (ROOT / h).is_file():
                seen.add(h)
                todo.append(h)
    return seen


@pytest.mark.parametrize("name", sorted(EXTENSIONS))
def test_headers_list_covers_the_includes(name):
    spec = EXTENSIONS[name]
    for s in spec["sources"]:
        assert (ROOT / s).is_file(), f"{name}: missing source {s}"
    missing = sorted(_included(spec["sources"]) - set(spec["sources"]) - set(spec.get("headers", [])))
    assert not missing, f"{name}: headers included by its sources but not listed: {missing}"
