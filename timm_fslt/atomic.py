"""Replace a directory so that its path holds a complete old or new copy at every instant.

``write_directory(path, files)`` writes the files into a fresh hidden sibling, fsyncs
them, then swaps the sibling and the old directory with one atomic exchange
(``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np(RENAME_SWAP)`` on macOS).
Where the file system cannot exchange, it falls back to two renames; a crash between
them leaves the old copy in a hidden ``.old`` sibling, and ``recover(path)`` (run by
every later save and load) moves it back.

Concurrent writers are serialised by an exclusive ``flock`` on the parent directory
(no lock file is left behind; writers of other directories in the same parent wait
too, for the milliseconds a swap takes). The kernel drops the lock of a killed
process, so a stale lock never blocks. Under the lock, siblings left by a crashed
writer are removed.

One file: ``write_bytes_atomic`` / ``write_text_atomic`` / ``write_json_atomic`` write a
temporary sibling, fsync it and rename it over the path (no lock: the last writer wins).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Mapping, Optional

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; saves are not serialised there
    fcntl = None

# Called with the name of each step of a save ("locked", "written", "swapped", "renamed",
# "cleaned"); the crash tests put a pause here to SIGKILL a save between two steps.
_STEP_HOOK: Optional[Callable[[str], None]] = None
_TAG = ".fslt-"
_LOCK_TIMEOUT = 60.0


def _step(name: str) -> None:
    if _STEP_HOOK is not None:
        _STEP_HOOK(name)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path, data: bytes, mode: str = "xb") -> None:
    """Write and fsync: a rename that follows must not reach the disk before the data."""
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# -- the exchange ------------------------------------------------------------------------

_libc = None


def _load_libc():
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True) if name else False
    return _libc or None


def exchange(a: Path, b: Path) -> bool:
    """Swap the two existing paths atomically; False where the platform cannot."""
    libc = _load_libc()
    if libc is None:
        return False
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        result = fn(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        result = fn(os.fsencode(a), os.fsencode(b), 0x2)  # RENAME_SWAP
    else:
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # this file system has no exchange
    raise OSError(code, os.strerror(code), str(a), None, str(b))


# -- siblings, lock and recovery ----------------------------------------------------------------

def _sibling_re(directory: Path) -> re.Pattern:
    return re.compile(re.escape(f".{directory.name}{_TAG}") + r"[0-9a-f]{8}\.(tmp|old)$")


def _siblings(directory: Path, kind: str) -> list[Path]:
    pattern = _sibling_re(directory)
    try:
        names = os.listdir(directory.parent)
    except FileNotFoundError:
        return []
    found = [directory.parent / n for n in names if (m := pattern.match(n)) and m.group(1) == kind]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns)


@contextlib.contextmanager
def locked(directory: Path, timeout: float = None):
    """Hold the exclusive writer lock of ``directory`` (waits up to ``timeout`` seconds)."""
    timeout = _LOCK_TIMEOUT if timeout is None else timeout
    if fcntl is None:
        yield
        return
    directory.parent.mkdir(parents=True, exist_ok=True)
    path = directory.parent
    fd = os.open(path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"another process has been writing into {str(path)!r} for over {timeout:g} s (it holds "
                        "the folder's lock); wait for it to finish") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def recover(directory: Path, is_complete: Callable[[Path], bool]) -> Optional[Path]:
    """If a crash between the two fallback renames left ``directory`` missing, move the
    newest complete ``.old`` copy back. Returns the restored path, or None."""
    if directory.exists():
        return None
    for old in reversed(_siblings(directory, "old")):
        if is_complete(old):
            try:
                os.rename(old, directory)
            except FileNotFoundError:  # another process restored it first
                return directory if directory.exists() else None
            fsync_dir(directory.parent)
            return directory
    return None


def recover_if_missing(directory: Path, is_complete: Callable[[Path], bool]) -> Optional[Path]:
    """``recover`` for readers: only when ``directory`` is missing and a ``.old`` copy exists, and
    under the writer lock, so that it never races a save that is between its two renames."""
    if directory.exists() or not _siblings(directory, "old"):
        return None
    with locked(directory):
        return recover(directory, is_complete)


def _remove_orphans(directory: Path) -> None:
    for path in _siblings(directory, "tmp") + _siblings(directory, "old"):
        shutil.rmtree(path, ignore_errors=True)


# -- the writer -----------------------------------------------------------------------------

def write_directory(directory: Path, files: Mapping[str, bytes],
                    is_complete: Callable[[Path], bool] = lambda p: True) -> None:
    """Make ``directory`` hold exactly ``files`` (name -> bytes), atomically.

    ``is_complete(path)`` tells a complete copy for crash recovery. Raises ``OSError``
    (with the path) or ``TimeoutError`` (another writer holds the lock).
    """
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    with locked(directory):
        _step("locked")
        recover(directory, is_complete)
        _remove_orphans(directory)
        tmp = parent / f".{directory.name}{_TAG}{uuid.uuid4().hex[:8]}.tmp"
        os.mkdir(tmp)
        try:
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
            for name, data in files.items():
                _write_file(tmp / name, data)
            fsync_dir(tmp)
            _step("written")
            if not directory.exists():
                os.rename(tmp, directory)
                _step("swapped")
            elif exchange(tmp, directory):
                _step("swapped")  # directory is new, tmp holds the old copy
            else:
                old = parent / f".{directory.name}{_TAG}{uuid.uuid4().hex[:8]}.old"
                os.rename(directory, old)
                _step("swapped")  # directory missing here: recover() brings `old` back
                try:
                    os.rename(tmp, directory)
                except BaseException as err:
                    try:
                        os.rename(old, directory)
                    except OSError as undo:
                        err.add_note(f"the old copy could not be moved back ({undo}); it is in {str(old)!r} "
                                     "and the next save or load restores it")
                    raise
                _step("renamed")
                shutil.rmtree(old, ignore_errors=True)
            fsync_dir(parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the old copy after an exchange, or a failed write
        _step("cleaned")


# -- single files -----------------------------------------------------------------------------

def write_bytes_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a flushed temporary file in the same folder and a
    rename: a reader (or a crash) sees the old file or the new one, never half of one."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"  # same folder: os.replace cannot cross file systems
    try:
        _write_file(tmp, data, "wb")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)  # never leave a half-written temporary beside the file
        raise


def write_text_atomic(path, text: str) -> None:
    """``write_bytes_atomic`` of ``text`` in UTF-8."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path, payload) -> None:
    """``payload`` as indented JSON with sorted keys and a final newline, written atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
