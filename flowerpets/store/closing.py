"""A store object used as a context manager: ``with`` closes it, whatever happened inside."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["Closing"]


class Closing:
    """``__enter__`` returns the object; ``__exit__`` calls its ``close``.

    When the block raised, the block's exception is the one that propagates; a close
    that fails after it is added to it as a note, not raised in its place.
    """

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        # The block's error is what went wrong (a full disk mid-commit); a close that fails
        # after it (the same full disk, releasing the lease) must not replace it.
        try:
            self.close()
        except Exception as secondary:
            exc.add_note(f"closing the {type(self).__name__} failed too: {secondary}")
