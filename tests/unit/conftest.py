"""Unit-test session hooks."""

from __future__ import annotations

_INTERPRETED = "test_triton_kernel_interpreted_matches_reference"
_kernels = None  # test_kernels.py's module (False: not in this session), once a unit test started


def pytest_runtest_setup(item) -> None:
    """As the first unit test starts, start the Triton interpreter's parity cases in their
    subprocess: they take longer than any other unit test, and run on another core meanwhile.
    (Not at collection: in a whole-suite run the integration tests come first.)"""
    global _kernels
    if _kernels is None:
        items = item.session.items
        _kernels = next((i.module for i in items if getattr(i, "originalname", "") == _INTERPRETED), False)
        if _kernels:
            _kernels.start_interpreter_worker(item.session)


def pytest_sessionfinish(session) -> None:
    if _kernels:
        _kernels.stop_interpreter_worker()
