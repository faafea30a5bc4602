"""Route gRPC core's own log lines (C code writing to stderr) into Python logging.

gRPC reports some refusals only there, never to Python: a plain-text client
that dials a TLS port fails the TLS handshake inside gRPC's C core, which logs
``Handshake failed with error SSL_ERROR_SSL: ... WRONG_VERSION_NUMBER`` on file
descriptor 2 and drops the connection. The server's log should say so plainly.

:class:`CoreLogRouter` points file descriptor 2 at a pipe and reads it on a
thread: lines in gRPC core's format are re-logged through ``logging`` (a
handshake failure with an explanation of what it usually means), everything
else is passed through unchanged to the original stderr, in order. Only the
command-line server and client install it; :meth:`CoreLogRouter.close` (also
run at exit) restores stderr and drains the pipe.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
import threading
from typing import Final, TextIO

__all__ = ["CoreLogRouter", "explain"]

log = logging.getLogger("flowerpets.transport.grpc")

# absl's format: "I1128 11:37:10.675424   23356 ssl_transport_security.cc:2563] message"
_LINE: Final = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ ([\w.\-/]+):\d+\] (.*)$")
_LEVELS: Final = {
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}
_HANDSHAKE: Final = re.compile(r"Handshake failed with (?:fatal )?error (\S+): (.*)")
_CAUSES: Final = (
    (
        ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"),
        "the peer did not speak TLS: a plain-text connection to this TLS port "
        "(a node without --root-cert?)",
    ),
    (
        ("CERTIFICATE_VERIFY_FAILED", "UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN"),
        "the certificate was not trusted (a node with another CA's certificate?)",
    ),
    (("NO_SHARED_CIPHER", "UNSUPPORTED_PROTOCOL"), "no TLS version or cipher in common"),
)


def explain(line: str) -> tuple[int, str] | None:
    """``(level, message)`` for a gRPC core log line; None if ``line`` is not one."""
    match = _LINE.match(line.rstrip("\r\n"))
    if match is None:
        return None
    level, source, message = match.groups()
    handshake = _HANDSHAKE.search(message)
    if handshake is not None:
        detail = handshake.group(2)
        cause = next(
            (text for keys, text in _CAUSES if any(key in detail for key in keys)),
            "see gRPC's reason",
        )
        return (
            logging.WARNING,
            f"refused a connection: the TLS handshake failed: {cause} "
            f"[gRPC: {handshake.group(1)}: {detail}]",
        )
    return _LEVELS[level], f"gRPC core ({source}): {message}"


class CoreLogRouter:
    """While installed, gRPC core's stderr lines go through ``logging``; the rest passes through."""

    def __init__(self) -> None:
        self._saved = -1
        self._write = -1
        self._thread: threading.Thread | None = None
        self._old_stderr: TextIO | None = None
        self._new_stderr: TextIO | None = None

    def install(self) -> CoreLogRouter:
        if self._thread is not None:
            return self
        sys.stderr.flush()
        read, write = os.pipe()
        self._saved = os.dup(2)
        self._write = write
        # Python keeps writing to the real stderr (so the pump never reads its own
        # output back); only what C code writes to descriptor 2 goes through the pipe.
        self._old_stderr = sys.stderr
        self._new_stderr = os.fdopen(
            os.dup(self._saved), "w", buffering=1, errors="backslashreplace"
        )
        sys.stderr = self._new_stderr
        self._swap_handlers(self._old_stderr, self._new_stderr)
        os.dup2(write, 2)
        self._thread = threading.Thread(
            target=self._pump, args=(read,), name="fp-grpc-log", daemon=True
        )
        self._thread.start()
        atexit.register(self.close)
        return self

    @staticmethod
    def _swap_handlers(old: TextIO, new: TextIO) -> None:
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for logger in loggers:
            for handler in getattr(logger, "handlers", ()):
                if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                    handler.setStream(new)

    def close(self) -> None:
        """Restore stderr and forward whatever is still in the pipe."""
        if self._thread is None:
            return
        os.dup2(self._saved, 2)  # C code writes straight to the real stderr again
        os.close(self._write)  # the pump sees the end of the pipe once it is drained
        self._thread.join(timeout=5)
        self._thread = None
        if sys.stderr is self._new_stderr and self._old_stderr is not None:
            self._new_stderr.flush()
            sys.stderr = self._old_stderr
            self._swap_handlers(self._new_stderr, self._old_stderr)
        os.close(self._saved)

    def _pump(self, read: int) -> None:
        pending = b""
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while True:
                try:
                    data = pipe.read(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._forward(line + b"\n")
            if pending:
                self._forward(pending)

    def _forward(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        explained = explain(text)
        try:
            if explained is None:
                os.write(self._saved, raw)
            else:
                log.log(*explained)
        except Exception:  # never let the pump die: stderr would block once the pipe is full
            with contextlib.suppress(OSError):
                os.write(self._saved, raw)
