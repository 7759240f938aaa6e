"""router/memory.py: the router's memory figures: its RSS split as /proc reports it, and its own part (the RSS
less the Ray object store's shared pages), which `memory_bound` bounds.
"""

from __future__ import annotations

import gc

import pytest

from moefleet.router.memory import freeze_startup_objects, memory

pytestmark = pytest.mark.unit


def test_memory_splits_the_rss_into_private_file_and_shared_pages():
    m = memory()
    assert set(m) == {"rss", "anon", "file", "shmem", "own"}
    assert m["anon"] + m["file"] + m["shmem"] == m["rss"]
    assert m["own"] == m["rss"] - m["shmem"] and 0 < m["own"] <= m["rss"]


def test_after_the_freeze_a_full_collection_sees_only_newer_objects():
    freeze_startup_objects()
    try:
        assert gc.get_freeze_count() > 0
        assert len(gc.get_objects()) < gc.get_freeze_count()
    finally:
        gc.unfreeze()  # the rest of the test session collects as before
