"""bench/llc.py: the last-level cache's size from sysfs and the buffer read between timed calls."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import llc  # noqa: E402


def test_last_level_cache_bytes():
    size = llc.last_level_cache_bytes()
    assert size is None or size >= 2 ** 10  # Linux reports a cache of at least a KiB, or nothing


def test_evictor_sizes(monkeypatch):
    assert llc.Evictor(8).mbytes == 8
    monkeypatch.setattr(llc, "last_level_cache_bytes", lambda: 40 * 2 ** 20)
    assert llc.Evictor().mbytes == 80
    monkeypatch.setattr(llc, "last_level_cache_bytes", lambda: 2 * 2 ** 20)
    assert llc.Evictor().mbytes == 64
    monkeypatch.setattr(llc, "last_level_cache_bytes", lambda: None)
    assert llc.Evictor().mbytes == 256


def test_evictor_reads_its_buffer():
    e = llc.Evictor(8)
    assert e._buf.numel() * 8 == 8 * 2 ** 20
    e.evict()


@pytest.mark.parametrize("mbytes", [0, -4])
def test_evictor_bad_size(mbytes):
    with pytest.raises(ValueError, match="mbytes"):
        llc.Evictor(mbytes)
