"""The global arrays as content-addressed files next to the store: ``<store>.arrays/<sha256>.fpa``.

A round's arrays (one codec frame, tens of MB) would cost SQLite a copy into
its pages, the log's fsync and a second copy at the checkpoint. Instead each
frame is one file named by its SHA-256, gathered straight from the arrays'
buffers with ``writev``, its bytes made durable with ``fdatasync`` while their
SHA-256 is computed, then renamed to it and made durable with the directory's
``fsync``, *inside* the round's transaction and before its ``COMMIT``: a committed round's row
never names a file that is not on disk. A crash before ``COMMIT`` leaves at
most a file no row names, which :meth:`ArrayFiles.collect` drops (on open,
and after each commit): kept as a spare that a later frame overwrites in place,
or deleted. Files are written and collected only under SQLite's
write lock, so a collector never deletes a file another writer is about to
commit. On read the file's SHA-256 must equal its name: a missing, cut or
altered file is :class:`~flowerpets.exceptions.CorruptStoreError`.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import sqlite3
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Final

from flowerpets.core.records import ArrayRecord
from flowerpets.exceptions import CorruptStoreError, StoreError, StoreWriteError
from flowerpets.store.encoding import encode_arrays_parts

__all__ = ["ArrayFiles", "Frame"]

_SUFFIX: Final = ".fpa"
_PARTIAL: Final = ".partial"  # being written
_TRASH: Final = ".trash"  # collected, being unlinked
_SPARE: Final = ".spare"  # collected, kept to be overwritten by a later round's frame
_SPARES: Final = 2  # spares kept at most; the rest are unlinked
_IOV_MAX: Final = 1024  # parts per writev (Linux's IOV_MAX)
_FULL_DISK: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def _sha256(views: list[memoryview]) -> hashlib._Hash:
    hasher = hashlib.sha256()
    for view in views:
        hasher.update(view)  # releases the GIL: overlaps the CRC and the write
    return hasher


def byte_views(parts: Sequence[bytes | memoryview]) -> list[memoryview]:
    """The frame's parts as flat byte views (no copy), empty ones dropped."""
    views = [memoryview(part).cast("B") for part in parts]
    return [view for view in views if view.nbytes]


class Frame:
    """One round's arrays as a codec frame, its SHA-256 under way on a helper thread.

    The hashing starts on every part but the CRC as soon as the codec has laid
    them out, so it runs while the codec computes its CRC and while the file is
    written; :meth:`digest` adds the CRC and waits.
    """

    def __init__(self, arrays: ArrayRecord, hashing: ThreadPoolExecutor) -> None:
        self._body: Future[hashlib._Hash] | None = None

        def start(body: list[bytes | memoryview]) -> None:
            self._body = hashing.submit(_sha256, byte_views(body))

        self.views = byte_views(encode_arrays_parts(arrays, before_crc=start))
        self.nbytes = sum(view.nbytes for view in self.views)

    def digest(self) -> bytes:
        if self._body is None:  # pragma: no cover - the codec always calls before_crc
            raise StoreError("the arrays' frame was never hashed")
        hasher = self._body.result()
        hasher.update(self.views[-1])  # the codec's CRC, the frame's last part
        return hasher.digest()

    def cancel(self) -> None:
        if self._body is not None:
            self._body.cancel()


class ArrayFiles:
    """The arrays directory of the store at ``store_path``; ``max_bytes`` caps the store."""

    def __init__(self, store_path: Path, *, max_bytes: int | None = None) -> None:
        self.store_path = store_path
        self.directory = store_path.with_name(store_path.name + ".arrays")
        self.max_bytes = max_bytes
        self._hasher: ThreadPoolExecutor | None = None
        self._deleter: ThreadPoolExecutor | None = None

    def path(self, digest: bytes) -> Path:
        return self.directory / f"{digest.hex()}{_SUFFIX}"

    # -- writing (under the write lock, before COMMIT) --------------------------------------------
    def encode(self, arrays: ArrayRecord) -> Frame:
        """``arrays`` as a codec frame (views of their buffers), hashing under way."""
        return Frame(arrays, self._hashing())

    def write(self, frame: Frame) -> tuple[bytes, float]:
        """Make ``frame`` durable under its SHA-256: the digest, and the seconds spent
        waiting for it once the bytes were written.

        The frame is gathered into the file (``os.writev``) straight from the
        arrays' buffers while the helper thread hashes it. A full disk (or
        ``max_bytes``) raises :class:`StoreWriteError` and leaves no file behind.
        """
        views = frame.views
        try:
            self._check_room(frame.nbytes)
            self._ensure_directory()
        except StoreWriteError:
            frame.cancel()
            raise
        # A spare (a dropped round's file) is overwritten in place: its blocks and pages
        # are there already, so the write allocates nothing and frees nothing.
        spare = self._spare()
        partial = spare or self.directory / f"{secrets.token_hex(8)}{_PARTIAL}"
        named: Path | None = None
        try:
            if spare is None:
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            else:
                fd = os.open(partial, os.O_WRONLY)
            try:
                _write_all(fd, list(views))
                if spare is not None and os.fstat(fd).st_size > frame.nbytes:
                    os.ftruncate(fd, frame.nbytes)  # a longer frame was there before
                # The bytes (and the size and blocks that find them) go to disk while the
                # helper thread finishes their SHA-256: only the name waits for it.
                os.fdatasync(fd)
                waited = time.perf_counter()
                digest = frame.digest()
                waited = time.perf_counter() - waited
                final = self.path(digest)
                if final.exists():
                    # The same frame is stored already (an unchanged model): make sure
                    # that copy is on disk rather than write it twice (a spare stays one).
                    if spare is None:
                        partial.unlink()
                    _fsync_path(final)
                else:
                    # The name is durable once the directory is fsynced; no row names the
                    # file until its round's COMMIT, after this.
                    os.rename(partial, final)
                    named = final
                    self._sync_directory()
            finally:
                os.close(fd)
        except (OSError, StoreWriteError) as exc:
            frame.cancel()
            for path in (partial, named):
                if path is not None:
                    with suppress(OSError):
                        path.unlink(missing_ok=True)
            if isinstance(exc, StoreWriteError):
                raise
            raise _write_error(exc) from exc
        return digest, waited

    def _check_room(self, nbytes: int) -> None:
        if self.max_bytes is None:
            return
        used = sum(
            _size(p) for p in (self.store_path, Path(f"{self.store_path}-wal"), *self._files())
        )
        if used + nbytes > self.max_bytes:
            raise StoreWriteError(
                f"the store is full: {nbytes} bytes of arrays do not fit in max_bytes"
            )

    def _spare(self) -> Path | None:
        try:
            return next(p for p in self.directory.iterdir() if p.name.endswith(_SPARE))
        except StopIteration:
            return None

    def _ensure_directory(self) -> None:
        if self.directory.is_dir():
            return
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            _fsync_directory(self.directory.parent)
        except OSError as exc:
            raise _write_error(exc) from exc

    def _sync_directory(self) -> None:
        _fsync_directory(self.directory)

    def _hashing(self) -> ThreadPoolExecutor:
        if self._hasher is None:
            self._hasher = ThreadPoolExecutor(1, thread_name_prefix="fp-store-digest")
        return self._hasher

    def _files(self) -> list[Path]:
        try:
            return list(self.directory.iterdir())
        except FileNotFoundError:
            return []

    # -- collecting (under the write lock) ----------------------------------------------------
    def collect(self, db: sqlite3.Connection) -> int:
        """Drop every file no arrays row names (a crashed commit's, a thinned round's).

        Call it inside a write transaction: no other writer is between its file and
        its ``COMMIT``. Each such file is renamed, under the lock, to a name no
        row can name: up to two become spares, which the next rounds' frames
        overwrite in place (no blocks allocated or freed, no pages to fault in:
        the cheapest durable write there is); the rest are unlinked on a helper
        thread (freeing a model's worth of blocks takes a while; a new round
        need not wait for it). A spare holds a dropped round's global arrays,
        nothing a row does not. Returns how many files were dropped.
        """
        named = {row[0] for row in db.execute("SELECT content FROM arrays")}
        files = self._files()
        spares = sum(path.name.endswith(_SPARE) for path in files)
        doomed: list[Path] = []
        dropped = 0
        for path in files:
            stem = path.name.removesuffix(_SUFFIX)
            if path.name.endswith(_SPARE) or (
                path.name.endswith(_SUFFIX) and _hex_digest(stem) in named
            ):
                continue
            keep = spares < _SPARES and not path.name.endswith(_TRASH)
            renamed = path.with_name(f"{secrets.token_hex(8)}{_SPARE if keep else _TRASH}")
            with suppress(OSError):  # one left behind goes at the next collection
                path.rename(renamed)
                dropped += 1
                if keep:
                    spares += 1
                else:
                    doomed.append(renamed)
        if doomed:
            self._deleting().submit(_unlink_all, doomed)
        return dropped

    def _deleting(self) -> ThreadPoolExecutor:
        if self._deleter is None:
            self._deleter = ThreadPoolExecutor(1, thread_name_prefix="fp-store-delete")
        return self._deleter

    # -- reading ----------------------------------------------------------------------------------
    def read(self, digest: bytes, nbytes: int, where: str) -> bytes:
        """The frame named ``digest``, checked: its length and its SHA-256."""
        try:
            frame = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise CorruptStoreError(f"{where} are missing: their file is gone") from None
        except OSError as exc:
            raise CorruptStoreError(f"{where} cannot be read: {exc.strerror}") from None
        if len(frame) != nbytes:
            raise CorruptStoreError(f"{where} have the wrong length: their file was damaged")
        if hashlib.sha256(frame).digest() != digest:
            raise CorruptStoreError(f"{where} do not match their SHA-256: their file was damaged")
        return frame

    def close(self) -> None:
        for pool in (self._hasher, self._deleter):
            if pool is not None:
                pool.shutdown(wait=True)
        self._hasher = self._deleter = None


def _hex_digest(stem: str) -> bytes | None:
    try:
        return bytes.fromhex(stem)
    except ValueError:
        return None


def _write_all(fd: int, views: list[memoryview]) -> None:
    """Every byte of ``views``, in order, in as few ``writev`` calls as the kernel allows."""
    at = 0
    while at < len(views):
        written = os.writev(fd, views[at : at + _IOV_MAX])
        if written == 0:
            raise StoreWriteError("cannot write the arrays: the file accepted no bytes")
        while written and at < len(views):
            size = views[at].nbytes
            if written >= size:
                written -= size
                at += 1
            else:
                views[at] = views[at][written:]
                written = 0


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        with suppress(OSError):  # left behind: the next collection takes it
            path.unlink(missing_ok=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_directory(directory: Path) -> None:
    _fsync_path(directory)


def _write_error(exc: OSError) -> StoreWriteError:
    if exc.errno in _FULL_DISK:
        return StoreWriteError(f"the disk is full: cannot write the arrays ({exc.strerror})")
    return StoreWriteError(f"cannot write the arrays: {exc.strerror}")
