"""Development credentials, TLS material checks, settings, the loopback rule, CLI helpers."""

from __future__ import annotations

import argparse
import datetime
import io
import ipaddress
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from flowerpets.core import ClientApp
from flowerpets.exceptions import (
    AppLoadError,
    ParameterTypeError,
    ParameterValueError,
    PathExistsError,
)
from flowerpets.transport import (
    ClientSettings,
    ClientTls,
    NodeClient,
    NodeKey,
    ServerSettings,
    ServerTls,
    TransportServer,
    create_credentials,
    is_loopback,
    load_public_keys,
)
from flowerpets.transport._loading import load_object, parse_config, parse_value
from flowerpets.transport.cli import add_certs_parser, run_certs
from flowerpets.transport.settings import split_address


def test_credentials_are_a_ca_a_server_certificate_and_node_keys(tmp_path: Path) -> None:
    made = create_credentials(tmp_path, names=["fl.example.org", "10.1.2.3"], nodes=2, days=30)
    assert made.ca_certificate and made.server_certificate and made.ca_key and made.server_key
    ca = x509.load_pem_x509_certificate(made.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
    ]
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert lifetime == datetime.timedelta(days=30)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    for private in (made.ca_key, made.server_key, *made.node_keys):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    keys = load_public_keys([made.node_public_keys])  # type: ignore[list-item]
    assert set(keys) == {NodeKey.load(p).public_bytes for p in made.node_keys}
    assert sorted(keys.values()) == ["node-0", "node-1"]
    ServerTls.from_files(made.server_certificate, made.server_key)  # the pair matches


def test_credentials_are_never_overwritten_without_force(tmp_path: Path) -> None:
    create_credentials(tmp_path)
    before = (tmp_path / "ca.pem").read_bytes()
    with pytest.raises(PathExistsError, match=r"ca\.pem exists"):
        create_credentials(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == before
    create_credentials(tmp_path, force=True)
    assert (tmp_path / "ca.pem").read_bytes() != before
    made = create_credentials(tmp_path / "keys", tls=False, nodes=1)
    assert made.ca_certificate is None and len(made.node_keys) == 1
    for bad in ({"days": 0}, {"nodes": -1}, {"tls": False}, {"names": ["has space"]}):
        with pytest.raises(ValueError):
            create_credentials(tmp_path / "x", **bad)  # type: ignore[arg-type]


def test_a_key_that_is_not_the_certificate_s_is_refused(tmp_path: Path) -> None:
    one = create_credentials(tmp_path / "one")
    two = create_credentials(tmp_path / "two")
    with pytest.raises(ValueError, match="is not the private key of the certificate"):
        ServerTls.from_files(one.server_certificate, two.server_key)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a PEM certificate"):
        ServerTls.from_files(one.server_key, one.server_key)  # type: ignore[arg-type]


def test_an_expired_certificate_is_loaded_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    made = create_credentials(tmp_path, days=1, now=old)
    with caplog.at_level(logging.WARNING):
        ClientTls.from_file(made.ca_certificate)  # type: ignore[arg-type]
    assert "the certificate is valid from 2019-12-31" in caplog.text


def test_certs_command_writes_and_reports(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_certs_parser(parser.add_subparsers())
    args = parser.parse_args(["certs", "--out", str(tmp_path), "--nodes", "1", "--name", "a.b"])
    out = io.StringIO()
    assert run_certs(args, out) == 0
    assert f"wrote {tmp_path / 'ca.key'} (0o600)" in out.getvalue()
    assert "keep" in out.getvalue() and "away from the nodes" in out.getvalue()
    assert run_certs(args, io.StringIO()) == 2  # exists already


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:9092", True),
        ("127.8.9.10:1", True),
        ("localhost:80", True),
        ("[::1]:9092", True),
        ("0.0.0.0:9092", False),
        ("[::]:9092", False),
        ("10.0.0.1:9092", False),
        ("example.org:443", False),
        ("localhost.example.org:1", False),
    ],
)
def test_loopback_rule(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


@pytest.mark.parametrize("bad", ["9092", "host:", ":80", "host:port", "host:70000", "[::1]"])
def test_bad_addresses(bad: str) -> None:
    with pytest.raises(ValueError):
        split_address(bad)


def test_plain_text_or_open_enrolment_off_loopback_needs_insecure(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    made = create_credentials(tmp_path, nodes=1)
    tls = ServerTls.from_files(made.server_certificate, made.server_key)  # type: ignore[arg-type]
    keys = load_public_keys([made.node_public_keys])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"refusing to serve plain text on 0\.0\.0\.0:0"):
        TransportServer("0.0.0.0:0", node_keys=keys)
    with pytest.raises(ValueError, match=r"refusing to accept any node on 0\.0\.0\.0:0"):
        TransportServer("0.0.0.0:0", tls=tls)
    TransportServer("0.0.0.0:0", tls=tls, node_keys=keys)  # the secure way: no warning
    assert "INSECURE" not in caplog.text
    with caplog.at_level(logging.WARNING):
        TransportServer("0.0.0.0:0", insecure=True)
    assert "INSECURE: serving PLAIN TEXT on 0.0.0.0:0" in caplog.text
    assert "INSECURE: node authentication is OFF" in caplog.text
    with pytest.raises(ValueError, match="node_keys is empty"):
        TransportServer("127.0.0.1:0", node_keys={})
    app = ClientApp()
    with pytest.raises(ValueError, match=r"refusing to connect in plain text to 10\.0\.0\.1:9092"):
        NodeClient(app, "10.0.0.1:9092")
    with caplog.at_level(logging.WARNING):
        NodeClient(app, "10.0.0.1:9092", insecure=True)
    assert "INSECURE: connecting in PLAIN TEXT to 10.0.0.1:9092" in caplog.text
    with pytest.raises(TypeError, match="ClientApp or a function"):
        NodeClient(42, "127.0.0.1:1")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"heartbeat_interval": 0},
        {"heartbeat_timeout": 1.0, "heartbeat_interval": 2.0},
        {"max_chunk_bytes": 100},
        {"max_message_bytes": 1.5},
        {"message_timeout": -1},
        {"hello_timeout": float("nan")},
        {"max_connections": 0},
    ],
)
def test_server_settings_are_validated(kwargs: dict[str, object]) -> None:
    # A value of the wrong type (1.5 for an int) is a TypeError, one out of range a ValueError.
    with pytest.raises((ParameterTypeError, ParameterValueError), match="ServerSettings"):
        ServerSettings(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs", [{"retry_initial": 0}, {"retry_for": -1}, {"max_chunk_bytes": 1 << 31}]
)
def test_client_settings_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(ParameterValueError, match="ClientSettings"):
        ClientSettings(**kwargs)  # type: ignore[arg-type]


def test_config_values_from_the_command_line() -> None:
    assert parse_config(["a=1", "b=-2.5", "c=true", "d=False", "e=text", "f='7'", "g=1e3"]) == {
        "a": 1,
        "b": -2.5,
        "c": True,
        "d": False,
        "e": "text",
        "f": "7",
        "g": 1000.0,
    }
    assert parse_value("--x") == "--x" and parse_value("nan") == "nan" and parse_value("") == ""
    assert parse_config(["k = v=w"]) == {"k": "v=w"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_config(["novalue"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_config(["=3"])


def test_app_specs_name_module_and_attribute() -> None:
    assert load_object("flowerpets.core:ClientApp") is ClientApp
    assert load_object("flowerpets.core:ClientApp.train") is ClientApp.train
    with pytest.raises(ValueError, match="MODULE:ATTRIBUTE"):
        load_object("flowerpets.core")
    with pytest.raises(AppLoadError, match="cannot import 'no_such_module'"):
        load_object("no_such_module:x")
    with pytest.raises(AppLoadError, match="has no attribute 'Nope'"):
        load_object("flowerpets.core:Nope")


def test_force_replaces_a_key_file_instead_of_rewriting_it_in_place(tmp_path: Path) -> None:
    """A descriptor opened on the old key never reads the new one (issue 9, item 8)."""
    first = create_credentials(tmp_path, nodes=1)
    old_keys = {p: p.read_bytes() for p in (first.ca_key, first.server_key, *first.node_keys)}
    assert first.server_key is not None
    first.server_key.chmod(0o644)  # a key someone made readable: the new one must not inherit it
    readers = {path: path.open("rb") for path in old_keys}  # type: ignore[union-attr]
    try:
        again = create_credentials(tmp_path, nodes=1, force=True)
        for path, reader in readers.items():
            assert reader.read() == old_keys[path], f"{path}: the new key shows through"
            assert path.read_bytes() != old_keys[path]  # type: ignore[union-attr]
    finally:
        for reader in readers.values():
            reader.close()
    for private in (again.ca_key, again.server_key, *again.node_keys):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private  # type: ignore[union-attr]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_the_output_directory_is_created_private_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        made = create_credentials(tmp_path / "a" / "creds", nodes=1)
        keys_only = create_credentials(tmp_path / "keys", tls=False, nodes=1)
    finally:
        os.umask(previous)
    for directory in (made.directory, keys_only.directory):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    assert made.server_key is not None and made.server_certificate is not None
    assert stat.S_IMODE(made.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(made.server_certificate.stat().st_mode) == 0o644


def test_the_command_line_module_loads_without_grpc_or_cryptography() -> None:
    """What ``transport/cli.py``'s docstring says it imports at load time (issue 9, item 17)."""
    code = (
        "import sys, flowerpets.transport.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'cryptography')"
        " or m.startswith('flowerpets.transport.')))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "['flowerpets.transport.cli']", out.stdout
