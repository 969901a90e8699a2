"""Whole-or-absent export folders: every exporter builds its files in a temporary sibling folder, which is fsynced
and swapped in as one step (:func:`export_dir`); file stems are plain names (:func:`safe_stem`).

On disk, next to ``<parent>/<name>``:

- ``.<name>.deployq-tmp-<pid>-<rand>``: the export being built (removed on error; a killed run's is removed by the
  next export of the same folder, and after a swap it briefly holds the previous export)
- ``.<name>.deployq-old-<pid>-<rand>``: the previous export, set aside (only where RENAME_EXCHANGE is missing)
- ``.<name>.deployq-lock``: held (``flock``) while an export of ``<name>`` runs; a second one is refused at once
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from .errors import DeployqError, InputError, UsageError

#: the file that marks a folder as a deployq export (one that :func:`export_dir` may replace)
MARKER = "deployq-export.json"
TMP_TAG, OLD_TAG, LOCK_TAG = ".deployq-tmp-", ".deployq-old-", ".deployq-lock"
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def safe_stem(name: str, what: str = "--name") -> str:
    """``name`` if it is a plain file stem (no path separator, ``..``, NUL or whitespace, not empty), else a
    :class:`UsageError` naming ``what``."""
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    bad = (not isinstance(name, str) or not name or name == "." or ".." in name or "\0" in name
           or any(c in seps for c in name) or any(c.isspace() for c in name))
    if bad:
        raise UsageError(f"file name stem {name!r} is not a plain name (no path separator, '..', NUL or "
                         "whitespace; not empty)", where=what,
                         fix="give a stem such as 'resnet20' and choose the folder with --out")
    return name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for d, _, files in os.walk(root):
        for f in files:
            _fsync_path(Path(d) / f)
        _fsync_path(Path(d), directory=True)


def _siblings(parent: Path, name: str, tag: str) -> list[tuple[Path, int]]:
    """``(path, pid)`` of the ``.<name><tag><pid>-<rand>`` folders in ``parent``."""
    pat = re.compile(re.escape(f".{name}{tag}") + r"(\d+)-[0-9a-f]+")
    found = []
    for p in parent.iterdir():
        m = pat.fullmatch(p.name)
        if m:
            found.append((p, int(m.group(1))))
    return found


def clean_stale(out: Path) -> list[Path]:
    """Remove the temporary / set-aside siblings of ``out`` left by killed runs (pid not alive, or this process:
    the caller holds the lock); a previous export set aside while ``out`` is missing is moved back first.
    Returns the removed paths."""
    parent, name = out.parent, out.name
    stale = [(p, pid) for tag in (TMP_TAG, OLD_TAG) for p, pid in _siblings(parent, name, tag)
             if pid == os.getpid() or not _pid_alive(pid)]
    old = sorted((p for p, _ in stale if OLD_TAG in p.name), key=lambda p: p.stat().st_mtime)
    if old and not os.path.lexists(out):
        os.rename(old[-1], out)  # killed between setting the old export aside and moving the new one in
        stale = [(p, pid) for p, pid in stale if p != old[-1]]
    for p, _ in stale:
        shutil.rmtree(p, ignore_errors=True)
    return [p for p, _ in stale]


def check_target(out: str | os.PathLike) -> Path:
    """The absolute export folder ``out`` (a symlink is followed), or an :class:`InputError` when it cannot be
    replaced by an export: a file, or a non-empty folder that is not a deployq export. Cheap: exporters may call
    it before any work."""
    path = Path(os.path.realpath(os.fspath(out)))
    if path.exists() and not path.is_dir():
        raise InputError("exists and is not a folder", where=out, fix="give a folder for --out")
    if path.is_dir():
        try:
            entries = [p.name for p in path.iterdir()]
        except OSError as e:
            raise InputError(f"cannot read the folder ({e.strerror})", where=out) from None
        if entries and MARKER not in entries:
            raise InputError(f"a non-empty folder that is not a deployq export (no {MARKER}); refusing to "
                             "replace it", where=out, fix="give a new or empty folder for --out")
    if path.parent == path:
        raise InputError("cannot export into the root folder", where=out, fix="give a folder for --out")
    return path


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold ``<parent>/.<name>.deployq-lock`` (``flock``, not waiting); the file is removed on release."""
    path = out.parent / f".{out.name}{LOCK_TAG}"
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise InputError(f"cannot write in this folder ({e.strerror})", where=out.parent,
                             fix="choose a writable --out folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DeployqError("another deployq export into this folder is running", where=out,
                               fix="wait for it to end, or export into another --out folder") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    else:
        raise DeployqError("could not take the export lock", where=path, fix="try again")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished ``tmp`` to ``out`` as one step; the previous export at ``out`` is removed."""
    _fsync_tree(tmp)
    blocked = _block_signals()
    try:
        if not os.path.lexists(out):
            os.rename(tmp, out)
        elif _rename_exchange(tmp, out):
            shutil.rmtree(tmp)  # now the previous export
        else:
            aside = out.parent / f".{out.name}{OLD_TAG}{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(out, aside)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(aside, out)
                raise
            shutil.rmtree(aside)
        _fsync_path(out.parent, directory=True)
    finally:
        _unblock_signals(blocked)


def _block_signals() -> set[int]:
    try:
        return signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    except (OSError, ValueError):
        return set()


def _unblock_signals(previous: set[int]) -> None:
    with contextlib.suppress(OSError, ValueError):
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def export_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Build an export of folder ``out`` in a fresh temporary sibling folder (yielded); on normal exit it is
    fsynced and swapped in as a whole, on an exception (Ctrl-C included) removed, leaving ``out`` as it was.

    Refused with :class:`InputError`: ``out`` is a file, a non-empty folder without ``deployq-export.json``,
    or in a folder that cannot be written; with :class:`DeployqError`: another export of ``out`` is running.
    """
    path = check_target(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create the parent folder ({e.strerror})", where=out,
                         fix="choose a writable --out folder") from None
    with _lock(path):
        clean_stale(path)
        check_target(path)
        tmp = path.parent / f".{path.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
        except OSError as e:
            raise InputError(f"cannot write in this folder ({e.strerror})", where=path.parent,
                             fix="choose a writable --out folder") from None
        try:
            yield tmp
            _commit(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
