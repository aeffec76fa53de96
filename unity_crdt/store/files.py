"""Plain files of the local_cache directory: the LOCK file, moving a corrupt database aside,
and small secret files (the device key).

Stdlib only; the SQLite store (`store.sqlite`) and the node build on these helpers.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from pathlib import Path

from ..errors import CacheLockedError, StoreError

__all__ = [
    "DB_NAME",
    "LOCK_NAME",
    "acquire_lock",
    "fsync_dir",
    "load_or_create_secret_file",
    "move_aside",
    "release_lock",
]

log = logging.getLogger(__name__)

DB_NAME = "store.sqlite3"
LOCK_NAME = "LOCK"
_DB_SUFFIXES = ("", "-wal", "-shm")
_KEY_MAGIC = b"UCK1"
_KEY_DIGEST = 8


def acquire_lock(cache_dir: Path) -> int:
    """Take the cache dir's LOCK (creating the dir 0700 if needed); return the held fd.

    The lock is an flock on `cache_dir/LOCK`, which holds "pid host" of the holder so the
    error for a second opener can name it. The kernel drops the lock if the holder dies.
    """
    path = cache_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:
        # Only on first use: mkdir on every open would cost a syscall for nothing.
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 256).decode("utf-8", "replace").split()
        os.close(fd)
        who = f"pid {holder[0]} on host {holder[1]}" if len(holder) == 2 else "another process"
        raise CacheLockedError(
            f"local cache {cache_dir} is in use by {who} (lock file {path})"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def release_lock(fd: int | None) -> None:
    """Clear the LOCK file's holder line and drop the lock (None: nothing held)."""
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor drops the flock


def move_aside(db: Path) -> Path:
    """Rename `db` (and its -wal/-shm) to the first free `<db>.corrupt-<n>`; return it.

    Corrupt files are kept for forensics, never deleted.
    """
    n = 1
    while any(db.with_name(f"{db.name}.corrupt-{n}{s}").exists() for s in _DB_SUFFIXES):
        n += 1
    target = db.with_name(f"{db.name}.corrupt-{n}")
    for suffix in _DB_SUFFIXES:
        src = db.with_name(db.name + suffix)
        if src.exists():
            os.rename(src, db.with_name(target.name + suffix))
    fsync_dir(db.parent)
    return target


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (new, renamed or removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_or_create_secret_file(path: Path, create: Callable[[], bytes], *, size: int = 32) -> bytes:
    """Read the secret in `path`, or create it once (0600, fsynced, never overwritten).

    File format: b"UCK1" + secret + blake2b-8(secret), so damage is detected. A damaged or
    wrong-size file raises StoreError naming the path and is left untouched.
    """
    path = Path(path)
    try:
        return _read_secret(path, size)
    except FileNotFoundError:
        pass
    secret = create()
    if len(secret) != size:
        raise ValueError(f"create() returned {len(secret)} bytes, expected {size}")
    body = _KEY_MAGIC + secret + hashlib.blake2b(secret, digest_size=_KEY_DIGEST).digest()
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        # link(), unlike rename(), fails if a racing creator got there first: theirs wins.
        os.link(tmp, path)
    except FileExistsError:
        return _read_secret(path, size)
    finally:
        os.unlink(tmp)
        fsync_dir(path.parent)
    return secret


def _read_secret(path: Path, size: int) -> bytes:
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        data = f.read(len(_KEY_MAGIC) + size + _KEY_DIGEST + 1)
    secret = data[len(_KEY_MAGIC) : len(_KEY_MAGIC) + size]
    digest = hashlib.blake2b(secret, digest_size=_KEY_DIGEST).digest()
    if (
        len(data) != len(_KEY_MAGIC) + size + _KEY_DIGEST
        or not data.startswith(_KEY_MAGIC)
        or data[-_KEY_DIGEST:] != digest
    ):
        raise StoreError(
            f"key file {path} is damaged or not a key file ({len(data)} bytes); it was left "
            "untouched: move it away to create a new key"
        )
    if mode & 0o077:
        log.warning("key file %s is readable by other users; run chmod 600 on it", path)
    return secret
