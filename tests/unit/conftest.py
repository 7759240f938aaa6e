"""Unit-test session hooks."""

from __future__ import annotations


def pytest_collection_finish(session) -> None:
    """Start the Triton interpreter's parity cases in their subprocess as soon as they are
    known: they take longer than any other unit test, and run on another core meanwhile."""
    module = _kernels_module(session)
    if module is not None:
        module.start_interpreter_worker(session)


def pytest_sessionfinish(session) -> None:
    module = _kernels_module(session)
    if module is not None:
        module.stop_interpreter_worker()


def _kernels_module(session):
    for item in session.items:
        if getattr(item, "originalname", "") == "test_triton_kernel_interpreted_matches_reference":
            return item.module
    return None
