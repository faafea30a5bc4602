"""Development certificates and node keys (``flowerpets certs``), made with ``cryptography``.

:func:`create_credentials` writes, into one directory:

``ca.pem``, ``ca.key``
    a development certificate authority (ECDSA P-256, valid ``days`` days).
    The nodes trust it (``--root-cert ca.pem``). Keep ``ca.key`` away from the
    nodes; for production, use your organisation's CA instead.
``server.pem``, ``server.key``
    the server's certificate, signed by that CA, for ``localhost``,
    ``127.0.0.1`` and ``::1`` plus the host names and IP addresses you give
    (``--name``): a node checks that the address it dials is one of them.
``node-<i>.key``, ``node-<i>.pub``, ``node-keys.pub``
    with ``nodes > 0``: one Ed25519 key pair per node (the private key in PEM,
    the public key as an OpenSSH line), and all the public keys in one file for
    the server's ``--node-keys``.

Private keys are written with mode 0600, into a new file that is renamed into
place (an existing key is replaced, never rewritten in place); a directory
that does not exist is created with mode 0700. Existing files are never
overwritten unless ``force`` is set.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flowerpets._validation import integer
from flowerpets.exceptions import ParameterValueError, PathExistsError
from flowerpets.transport._auth import NodeKey

__all__ = [
    "Credentials",
    "create_credentials",
    "write_node_keys",
]

DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class Credentials:
    """The files :func:`create_credentials` wrote (None for those it was not asked for)."""

    directory: Path
    ca_certificate: Path | None
    ca_key: Path | None
    server_certificate: Path | None
    server_key: Path | None
    node_keys: tuple[Path, ...]
    node_public_keys: Path | None


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    """Write ``data`` to a new file at ``path``, created with its final mode.

    A private key's file is 0600 from its creation, so its bytes are never
    readable by others, not even for a moment. With ``force`` an existing file
    is replaced by renaming a new one over it, never truncated and rewritten in
    place: a descriptor someone opened on the old file never sees the new key.
    """
    mode = 0o600 if private else 0o644
    target = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp") if force else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise PathExistsError(f"{path} exists; pass force=True (--force) to overwrite") from None
    try:
        os.fchmod(fd, mode)  # the umask can only have taken bits away: make the mode exact
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        if force:
            os.replace(target, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        raise


def _directory(path: Path) -> Path:
    """``path`` as a directory, created with mode 0700 if it does not exist (parents too)."""
    if not path.is_dir():
        for parent in reversed(path.parents):
            if not parent.exists():
                parent.mkdir(mode=0o700, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)  # mkdir's mode is masked by the umask; this is exact
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _check_names(names: Sequence[str]) -> list[str]:
    out: list[str] = []
    for name in [*DEFAULT_NAMES, *names]:
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise ParameterValueError(
                f"a server name must be a non-empty host name or IP, got {name!r}"
            )
        if name not in out:
            out.append(name)
    return out


def create_credentials(
    out: str | os.PathLike[str],
    *,
    names: Sequence[str] = (),
    days: int = 90,
    nodes: int = 0,
    tls: bool = True,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> Credentials:
    """Write a development CA, a server certificate and ``nodes`` node key pairs into ``out``."""
    integer("days", days, at_least=1)
    integer("nodes", nodes, at_least=0)
    if not tls and nodes == 0:
        raise ParameterValueError("nothing to create: tls=False and nodes=0")
    all_names = _check_names(names)
    directory = _directory(Path(out))
    ca_cert = ca_key = server_cert = server_key = None
    if tls:
        ca_cert, ca_key = directory / "ca.pem", directory / "ca.key"
        server_cert, server_key = directory / "server.pem", directory / "server.key"
        for path in (ca_cert, ca_key, server_cert, server_key):
            if path.exists() and not force:
                raise PathExistsError(f"{path} exists; pass force=True (--force) to overwrite")
        start = (now or datetime.datetime.now(datetime.UTC)) - datetime.timedelta(minutes=5)
        end = start + datetime.timedelta(days=days)
        ca_private = ec.generate_private_key(ec.SECP256R1())
        ca = _ca_certificate(ca_private, start, end)
        private = ec.generate_private_key(ec.SECP256R1())
        cert = _server_certificate(private, ca, ca_private, all_names, start, end)
        _write(ca_key, _pem_key(ca_private), private=True, force=force)
        _write(ca_cert, ca.public_bytes(serialization.Encoding.PEM), private=False, force=force)
        _write(server_key, _pem_key(private), private=True, force=force)
        _write(
            server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False, force=force
        )
    node_files, public = write_node_keys(directory, nodes, force=force) if nodes else ((), None)
    return Credentials(
        directory=directory,
        ca_certificate=ca_cert,
        ca_key=ca_key,
        server_certificate=server_cert,
        server_key=server_key,
        node_keys=node_files,
        node_public_keys=public,
    )


def write_node_keys(
    out: str | os.PathLike[str], count: int, *, force: bool = False
) -> tuple[tuple[Path, ...], Path]:
    """``count`` Ed25519 node key pairs, and ``node-keys.pub`` listing every public key."""
    directory = _directory(Path(out))
    keys = [NodeKey.generate() for _ in range(count)]
    private_files = []
    lines = []
    for index, key in enumerate(keys):
        private_path = directory / f"node-{index}.key"
        public_line = key.public_openssh(f"node-{index}")
        _write(private_path, key.private_pem(), private=True, force=force)
        _write(
            directory / f"node-{index}.pub",
            (public_line + "\n").encode(),
            private=False,
            force=force,
        )
        private_files.append(private_path)
        lines.append(public_line)
    listing = directory / "node-keys.pub"
    _write(listing, ("\n".join(lines) + "\n").encode(), private=False, force=force)
    return tuple(private_files), listing


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, start: datetime.datetime, end: datetime.datetime
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flowerpets development"),
            x509.NameAttribute(NameOID.COMMON_NAME, "flowerpets development CA"),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: Sequence[str],
    start: datetime.datetime,
    end: datetime.datetime,
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flowerpets development"),
            x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
