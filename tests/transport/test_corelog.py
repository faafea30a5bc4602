"""gRPC core's stderr lines, routed into the log with an explanation."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

from flowerpets.transport._corelog import explain

from .conftest import ROOT

# Captured from grpcio 1.85 when a plain-text client dials a TLS port.
PLAIN_TEXT_TO_TLS = (
    "I1128 11:37:10.675424   23356 ssl_transport_security.cc:2563] Handshake failed with error "
    "SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid "
    "certificate verification context\n"
)


def test_a_plain_text_handshake_failure_is_explained() -> None:
    explained = explain(PLAIN_TEXT_TO_TLS)
    assert explained is not None
    level, message = explained
    assert level == logging.WARNING
    assert message.startswith("refused a connection: the TLS handshake failed: the peer did not")
    assert "plain-text connection to this TLS port" in message
    assert "WRONG_VERSION_NUMBER" in message


def test_other_lines() -> None:
    untrusted = PLAIN_TEXT_TO_TLS.replace("WRONG_VERSION_NUMBER", "TLSV1_ALERT_UNKNOWN_CA")
    assert "was not trusted" in explain(untrusted)[1]  # type: ignore[index]
    other = "E1128 11:37:10.675424   23356 chttp2_transport.cc:12] something broke"
    assert explain(other) == (logging.ERROR, "gRPC core (chttp2_transport.cc): something broke")
    assert explain("2026-01-01 12:00:00,000 INFO x: a Python log line") is None
    assert explain("Traceback (most recent call last):") is None


def test_the_router_translates_core_lines_and_passes_the_rest_in_order() -> None:
    script = textwrap.dedent(
        f"""
        import logging, os, sys
        from flowerpets.transport._corelog import CoreLogRouter
        router = CoreLogRouter().install()
        logging.basicConfig(level=logging.INFO, format="PY %(levelname)s %(message)s")
        logging.getLogger("app").info("before")
        os.write(2, {PLAIN_TEXT_TO_TLS!r}.encode())
        os.write(2, b"raw C line\\n")
        router.close()
        logging.getLogger("app").info("after")
        print("stdout untouched")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "PY INFO before"
    assert lines[1].startswith("PY WARNING refused a connection: the TLS handshake failed")
    assert lines[2] == "raw C line"
    assert lines[3] == "PY INFO after"
    assert done.stdout == "stdout untouched\n"
