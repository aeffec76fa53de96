"""Plain files of the local_cache directory: its private modes, the LOCK file, putting a
rebuilt database in place (keeping the damaged one), and small secret files (the device key).

Stdlib only; the SQLite store (`store.sqlite`) and the node build on these helpers. The cache
holds every doc in clear, so the directory is 0700 and every file in it 0600 (tightened on
start if an older version or a user left them looser). Modes are set per file (created with
0600, or chmod-ed) rather than with a umask: the umask is process-wide, and flipping it
around a connect would race with every other thread creating files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from ..errors import CacheLockedError, StoreError

__all__ = [
    "DB_NAME",
    "LOCK_NAME",
    "acquire_lock",
    "cache_os_error",
    "fsync_dir",
    "load_or_create_secret_file",
    "make_private",
    "prepare_cache_dir",
    "release_lock",
    "replace_db",
    "write_private_file",
]

log = logging.getLogger(__name__)

DB_NAME = "store.sqlite3"
LOCK_NAME = "LOCK"
_DB_SUFFIXES = ("", "-wal", "-shm")
_KEY_MAGIC = b"UCK1"
_KEY_DIGEST = 8


_DIR_MODE = 0o700
_FILE_MODE = 0o600


def cache_os_error(cache_dir: Path, exc: OSError, doing: str) -> StoreError:
    """A StoreError that says plainly why the cache dir cannot be used."""
    if exc.errno == errno.EROFS:
        why = "it is on a read-only file system"
    elif exc.errno in (errno.EACCES, errno.EPERM):
        why = "this user may not write there (check its owner and mode)"
    elif exc.errno == errno.ENOSPC:
        why = "the disk is full"
    else:
        why = exc.strerror or str(exc)
    return StoreError(f"cannot {doing} local cache {cache_dir}: {why} ({exc})")


def prepare_cache_dir(cache_dir: Path) -> None:
    """Create the cache dir 0700, or tighten an existing one to 0700; StoreError if unusable."""
    try:
        try:
            mode = os.stat(cache_dir).st_mode
        except FileNotFoundError:
            cache_dir.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
            mode = os.stat(cache_dir).st_mode
        if mode & 0o077:
            os.chmod(cache_dir, _DIR_MODE)
            log.warning(
                "local cache %s was readable by other users (mode %o); set it to 0700",
                cache_dir,
                mode & 0o777,
            )
    except OSError as exc:
        raise cache_os_error(cache_dir, exc, "create or use") from exc


def make_private(path: Path) -> None:
    """Create `path` empty with mode 0600 if missing, else tighten it to 0600 if looser."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    except FileExistsError:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
            os.chmod(path, _FILE_MODE)
    else:
        os.close(fd)


def acquire_lock(cache_dir: Path) -> int:
    """Take the cache dir's LOCK (creating the dir 0700 if needed); return the held fd.

    The lock is an flock on `cache_dir/LOCK`, which holds "pid host" of the holder so the
    error for a second opener can name it. The kernel drops the lock if the holder dies.
    An unusable dir (read-only, not ours, missing parent) raises StoreError saying so.
    """
    path = cache_dir / LOCK_NAME
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
        except FileNotFoundError:
            # Only on first use: mkdir on every open would cost a syscall for nothing.
            cache_dir.mkdir(parents=True, exist_ok=True, mode=_DIR_MODE)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, _FILE_MODE)
    except OSError as exc:
        raise cache_os_error(cache_dir, exc, "lock") from exc
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
    with contextlib.suppress(OSError):  # the holder line only helps an error message
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


def release_lock(fd: int | None) -> None:
    """Clear the LOCK file's holder line and drop the lock (None: nothing held)."""
    if fd is not None:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor drops the flock


def replace_db(db: Path, new: Path, *, keep_old: bool) -> Path | None:
    """Put the finished database `new` in place of `db`; with `keep_old`, the old one stays
    as `<db>.corrupt-<n>` (returned).

    The old file is hard-linked to its new name before `new` replaces it, so a crash at any
    point leaves `db` whole (the old or the new file). The old -wal goes first: a WAL left
    beside another database would be replayed into it.
    """
    target = _aside_name(db) if keep_old else None
    for suffix in _DB_SUFFIXES:
        src = db.with_name(db.name + suffix)
        if target is not None and src.exists():
            dst = db.with_name(target.name + suffix)
            os.link(src, dst)
            make_private(dst)
        if suffix:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(src)
    os.replace(new, db)
    fsync_dir(db.parent)
    return target


def _aside_name(db: Path) -> Path:
    n = 1
    while any(db.with_name(f"{db.name}.corrupt-{n}{s}").exists() for s in _DB_SUFFIXES):
        n += 1
    return db.with_name(f"{db.name}.corrupt-{n}")


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
    except OSError as exc:
        raise cache_os_error(path.parent, exc, f"read the key file {path.name} of") from exc
    try:
        return _create_secret(path, create, size)
    except OSError as exc:
        raise cache_os_error(path.parent, exc, f"create the key file {path.name} in") from exc


def _create_secret(path: Path, create: Callable[[], bytes], size: int) -> bytes:
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


def write_private_file(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: a 0600 temporary file, fsynced, renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise cache_os_error(path.parent, exc, f"write {path.name} in") from exc
