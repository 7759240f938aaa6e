"""core/errors.py: what a status message may carry of a client's strings and of Ray's
wrapping."""

from __future__ import annotations

import pytest

from moefleet.core.errors import InvalidArgument, NotFound, message_of, quote

pytestmark = pytest.mark.unit


def test_quote_keeps_short_strings_whole_and_cuts_long_ones_saying_how_long() -> None:
    assert quote("tiny") == "'tiny'"
    cut = quote("x" * 1_000_000)
    assert len(cut) < 260 and cut.endswith("(1000002 characters)")


class _Wrapped(NotFound):
    """Like Ray's task error: a subclass of the cause whose str() is a remote traceback."""

    def __init__(self, cause: BaseException):
        super().__init__("\x1b[36mray::Controller.status()\x1b[39m (pid=1)\n  File ...\n" + str(cause))
        self.cause = cause


def test_message_of_unwraps_to_the_domain_message_alone() -> None:
    inner = NotFound("unknown model 'x'")
    assert message_of(_Wrapped(inner)) == "unknown model 'x'"
    assert message_of(_Wrapped(_Wrapped(inner))) == "unknown model 'x'"
    assert message_of(InvalidArgument("plain")) == "plain"
