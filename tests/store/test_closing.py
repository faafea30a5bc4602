"""A store object closed by ``with``: the block's own error is never replaced by the close's."""

from __future__ import annotations

import pytest

from flowerpets.exceptions import StoreWriteError, UsageError
from flowerpets.store.closing import Closing


class FailingClose(Closing):
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1
        raise StoreWriteError("cannot release the lease: the disk is full")


def test_the_blocks_error_propagates_with_the_close_failure_as_a_note() -> None:
    with (
        pytest.raises(UsageError, match="the commit failed") as raised,
        FailingClose() as store,
    ):
        raise UsageError("the commit failed")
    assert store.closed == 1
    assert raised.value.__notes__ == [
        "closing the FailingClose failed too: cannot release the lease: the disk is full"
    ]


def test_a_close_that_fails_after_a_clean_block_raises() -> None:
    with pytest.raises(StoreWriteError, match="disk is full"), FailingClose() as store:
        pass
    assert store.closed == 1
