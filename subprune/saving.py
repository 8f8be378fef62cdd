"""Crash-safe replacement of a directory: the one save protocol of every subprune save.

A save is written into a temporary sibling ``.NAME.tmp-XXXX`` of the target
``NAME``, every file and the directory are fsync-ed, and the sibling then takes
the target's place in one step:

* **exchange** (Linux): ``renameat2(RENAME_EXCHANGE)`` swaps the two directory
  entries atomically; the sibling then holds the previous save, which is
  removed. A new target is created with ``renameat2(RENAME_NOREPLACE)``.
* **journal** (any POSIX system, and filesystems without the exchange): a
  journal directory ``.NAME.old-XXXX`` records the sibling's name, then
  ``NAME -> .NAME.old-XXXX/previous`` and ``.NAME.tmp-XXXX -> NAME``, then the
  journal is removed. A crash between the two renames leaves no ``NAME``;
  :func:`recover` (run by the next save and the next load) completes the swap
  from the journal, and :func:`current_version` finds the complete version
  meanwhile.

A running save holds an exclusive ``flock`` on its sibling (and journal), so
the next run removes only the strays of dead processes; swaps and recoveries
take a short lock on the parent directory, so concurrent saves of one target
serialise their swaps and the last one wins. Ctrl-C (SIGINT) while the files
are written or fsync-ed rolls the save back; once the swap has begun it is
finished first; either way :class:`SaveInterrupted` says which. A reader pins
one version through a directory file descriptor (:func:`read_version`), so the
files it reads are all of one save even while another save swaps the target.
The format and the crash cases are described in ``docs/saving.md``.

This module uses the standard library only, so that a process can save without
importing torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

try:
    import fcntl
except ImportError:  # Windows: no locks (concurrent saves of one target are not supported there)
    fcntl = None

JOURNAL_FILE = "journal.json"
PREVIOUS = "previous"
JOURNAL_FORMAT = "subprune-swap-v1"
PROTOCOLS = ("exchange", "journal")
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_SPACE_MARGIN = 64 << 10  # bytes beyond the tensors (JSON files, headers, directory blocks), plus 2 %

T = TypeVar("T")


def tmp_prefix(name: str) -> str:
    """Name prefix of the temporary sibling that a save of ``name`` writes into."""
    return f".{name}.tmp-"


def old_prefix(name: str) -> str:
    """Name prefix of the journal directory of a two-rename swap of ``name``."""
    return f".{name}.old-"


def strays(target: str | os.PathLike) -> list[Path]:
    """The ``.NAME.tmp-*`` and ``.NAME.old-*`` entries beside ``target`` (live or dead), sorted."""
    target = Path(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    prefixes = (tmp_prefix(target.name), old_prefix(target.name))
    return sorted(target.parent / n for n in names if n.startswith(prefixes))


class SaveInterrupted(KeyboardInterrupt):
    """Ctrl-C reached a save: ``saved`` says whether the new save was put in place (finished) or rolled back.

    A subclass of KeyboardInterrupt, so that code catching Ctrl-C still sees it.
    """

    def __init__(self, target: Path, saved: bool):
        self.target, self.saved = Path(target), saved
        if saved:
            message = f"interrupted during the save: the swap was finished first, {target} holds the new save"
        else:
            message = f"interrupted during the save: it was rolled back, {target} is as before (nothing was saved)"
        super().__init__(message)


# --- renameat2 ------------------------------------------------------------------------------------------------------


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.4
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()


def exchange_available() -> bool:
    """Whether this system offers ``renameat2`` (its filesystem may still refuse RENAME_EXCHANGE)."""
    return _RENAMEAT2 is not None


def _renameat2(source: Path, destination: Path, flags: int) -> None:
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(source), None, str(destination))


# --- small file-system steps ----------------------------------------------------------------------------------------


def _fsync(path: Path, directory: bool = False) -> None:
    if os.name == "nt" and directory:
        return
    fd = os.open(path, os.O_RDONLY | (_O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot fsync a directory
        if exc.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath), directory=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def publish_permissions(path: Path) -> None:
    """Give ``path`` and everything under it the permissions of a plain write (the umask).

    ``tempfile`` creates private directories (0700) and files (0600).
    """
    mask = _umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def _hold(path: Path) -> int | None:
    """Open ``path`` and take an exclusive flock on it (released when the fd is closed, or the process dies)."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:  # a filesystem without flock (some network mounts): no lock
        os.close(fd)
        if exc.errno in (errno.ENOLCK, *_UNSUPPORTED):
            return None
        raise
    return fd


def _release(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def _remove_version(path: Path) -> None:
    """Remove a replaced save once no reader holds it (readers take a shared flock, :func:`read_version`)."""
    fd = None
    with contextlib.suppress(OSError):
        fd = _hold(path)
    try:
        _remove(path)
    finally:
        _release(fd)


def _is_held(path: Path) -> bool:
    """True when a live process holds the flock of ``path`` (a save in progress)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | (_O_DIRECTORY if path.is_dir() else 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    """A short exclusive lock on the directory holding the target: swaps and recoveries never overlap."""
    fd = _hold(parent)
    try:
        yield
    finally:
        _release(fd)


# --- Ctrl-C ---------------------------------------------------------------------------------------------------------


class _Deferral:
    caught = False


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[_Deferral]:
    """Record SIGINT instead of raising it inside the block (main thread with the default handler only)."""
    state = _Deferral()
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield state
        return

    def record(signum, frame):
        state.caught = True

    signal.signal(signal.SIGINT, record)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# --- recovery -------------------------------------------------------------------------------------------------------


def _journal(old: Path, target: Path) -> Path | None:
    """The new version named by the journal in ``old`` (a sibling of ``target``), or None if there is none."""
    try:
        record = json.loads((old / JOURNAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    new = record.get("new") if isinstance(record, dict) and record.get("format") == JOURNAL_FORMAT else None
    if not isinstance(new, str) or Path(new).name != new or not new.startswith(tmp_prefix(target.name)):
        return None
    return target.parent / new


def _recover_journal(target: Path, old: Path) -> str:
    """Complete or roll back the two-rename swap recorded in the dead journal ``old``; say what was done."""
    previous, new = old / PREVIOUS, _journal(old, target)
    if not os.path.lexists(previous):
        _remove(old)
        return f"removed {old.name}: a swap that had not started (rolled back)"
    if os.path.lexists(target):
        _remove_version(previous)
        _remove(old)
        return f"removed {old.name}: the previous save of a swap that had finished"
    if new is not None and not new.is_dir():  # its second rename happened: a later swap moved that save on
        _remove_version(previous)
        _remove(old)
        return f"removed {old.name}: the previous save of a swap that had finished (a later swap is recovered apart)"
    if new is not None:
        os.rename(new, target)
        _remove_version(previous)
        outcome = f"completed the interrupted swap of {target.name} (the new save from {new.name})"
    else:  # no journal (an older subprune): put the previous save back
        os.rename(previous, target)
        outcome = f"rolled back the interrupted swap of {target.name} (the previous save restored)"
    _fsync(target.parent, directory=True)
    _remove(old)
    return outcome


def recover(target: str | os.PathLike) -> list[str]:
    """Finish what crashed saves of ``target`` left: complete or roll back swaps, remove dead temporary siblings.

    Strays of saves still running (their lock is held) are left alone. Run by
    every save and every load; safe to call at any time.

    Returns
    -------
    list of str
        One line per stray handled.

    Raises
    ------
    OSError
        If a stray cannot be removed or renamed (e.g. a read-only filesystem).
    """
    target = Path(os.path.abspath(target))
    found = strays(target)
    if not found:
        return []
    done = []
    with _parent_lock(target.parent):
        journals = [p for p in found if p.name.startswith(old_prefix(target.name))]
        for old in journals:  # first: a journal may name a temporary sibling that holds the new save
            if old.exists() and not _is_held(old):
                done.append(_recover_journal(target, old))
        for tmp in strays(target):
            if tmp.name.startswith(tmp_prefix(target.name)) and not _is_held(tmp):
                _remove(tmp)
                done.append(f"removed {tmp.name}: an unfinished save or the previous save of a finished swap")
        if done:
            _fsync(target.parent, directory=True)
    return done


def current_version(target: str | os.PathLike) -> Path:
    """The directory holding the complete save of ``target`` now: ``target``, or mid-swap the journal's version.

    Between the two renames of a journal swap ``target`` does not exist; the
    save that :func:`recover` would put in place is returned instead (the new
    one if the journal names it, else the previous one). Without a save,
    ``target`` itself is returned.
    """
    target = Path(target)
    if target.is_dir():
        return target
    for old in strays(target):
        if old.name.startswith(old_prefix(target.name)) and (old / PREVIOUS).is_dir():
            new = _journal(old, target)
            if new is None:
                return old / PREVIOUS
            if new.is_dir():
                return new
            # else a swap that had finished: its previous save may be half removed; the swap in flight is another
    return target


def read_version(target: str | os.PathLike, read: Callable[[Path], T], attempts: int = 20) -> T:
    """Run ``read(path)`` on one complete version of ``target``, pinned by a directory file descriptor.

    Dead strays are recovered first where the filesystem allows it. On Linux
    ``path`` is ``/proc/self/fd/N`` and the version is held with a shared
    flock: a concurrent save may swap ``target`` meanwhile, but removes the
    replaced version only once no reader holds it, so every file read belongs
    to the same complete save. Elsewhere ``path`` is the version's path.

    Raises
    ------
    FileNotFoundError
        If ``target`` holds no save; whatever ``read`` raises on a complete version.
    OSError
        If the target was replaced ``attempts`` times while a reader tried to pin it.
    """
    target = Path(target)
    with contextlib.suppress(OSError):
        recover(target)
    for _ in range(attempts):
        version = current_version(target)
        try:
            fd = os.open(version, os.O_RDONLY | _O_DIRECTORY)
        except FileNotFoundError:
            if version == target:
                raise  # no save
            continue  # a swap in flight renamed that version to the target meanwhile
        try:
            if fcntl is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(fd, fcntl.LOCK_SH)
            identity = os.fstat(fd)
            try:
                now = os.stat(current_version(target))
            except OSError:
                continue
            if (now.st_dev, now.st_ino) != (identity.st_dev, identity.st_ino):
                continue  # replaced (and maybe being removed) before it was pinned: pin the new one
            pinned = Path(f"/proc/self/fd/{fd}")
            return read(pinned if pinned.is_dir() else version)
        finally:
            os.close(fd)
    raise OSError(f"{target} was replaced {attempts} times while it was being opened; try again")


# --- checks before work ---------------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB"


def check_destination(target: str | os.PathLike, expected_bytes: int | None = None) -> Path:
    """Refuse a save target that cannot be written, before any work: a mount point, read-only, too little space.

    Parameters
    ----------
    target : path-like
        The directory a save will replace (it may not exist yet).
    expected_bytes : int, optional
        Expected size of the save (parameter count x dtype size); the
        filesystem must have that much free beside the existing save.

    Returns
    -------
    Path
        ``target`` made absolute.

    Raises
    ------
    ValueError
        ``target`` is a mount point (a directory that cannot be swapped).
    PermissionError
        Nothing can be created beside ``target`` (read-only filesystem, permissions).
    OSError
        Less free space than ``expected_bytes``.
    """
    target = Path(os.path.abspath(target))
    if os.path.ismount(target):
        raise ValueError(f"{target} is a mount point: a save replaces its directory as a whole, which a mount "
                         f"point does not allow; save into a folder inside it, e.g. {target / 'pruned'}")
    base = target.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        probe = tempfile.mkdtemp(dir=base, prefix=tmp_prefix(target.name))
    except OSError as exc:
        raise PermissionError(f"cannot write a save at {target}: {base} is not writable ({exc.strerror}); "
                              "choose a writable directory") from None
    with contextlib.suppress(FileNotFoundError):  # (a concurrent save's recovery may have removed it already)
        os.rmdir(probe)
    if expected_bytes is not None:
        need, free = int(expected_bytes * 1.02) + _SPACE_MARGIN, shutil.disk_usage(base).free
        if free < need:
            raise OSError(f"not enough free space for the save at {target}: it needs about {_mb(need)} (parameters "
                          f"x dtype size), the filesystem of {base} has {_mb(free)} free; free some space or choose "
                          "another directory")
    return target


# --- the save -------------------------------------------------------------------------------------------------------


def _nothing() -> None:
    return None


def _swap_exchange(tmp: Path, target: Path) -> Callable[[], None] | None:
    """Put ``tmp`` in place of ``target`` with renameat2; the cleanup to run, or None if the filesystem cannot."""
    try:
        if os.path.lexists(target):
            _renameat2(tmp, target, _RENAME_EXCHANGE)
            previous = tmp  # the exchange left the previous save at the temporary name
        else:
            _renameat2(tmp, target, _RENAME_NOREPLACE)
            previous = None
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return None
        raise
    _fsync(target.parent, directory=True)
    return _nothing if previous is None else lambda: _remove_version(previous)


def _swap_journal(tmp: Path, target: Path) -> Callable[[], None]:
    """Put ``tmp`` in place of ``target`` with two renames recorded in a journal directory; the cleanup to run."""
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=old_prefix(target.name)))
    lock = _hold(old)

    def cleanup() -> None:  # the journal stays locked (a live swap) until the previous save is gone
        try:
            if (old / PREVIOUS).is_dir():
                _remove_version(old / PREVIOUS)
            _remove(old)
        finally:
            _release(lock)

    try:
        with open(old / JOURNAL_FILE, "w") as f:
            json.dump({"format": JOURNAL_FORMAT, "target": target.name, "new": tmp.name}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync(old, directory=True)
        _fsync(target.parent, directory=True)
        if os.path.lexists(target):
            os.rename(target, old / PREVIOUS)
            _fsync(target.parent, directory=True)
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old / PREVIOUS, target)
                raise
        else:
            os.rename(tmp, target)
        _fsync(target.parent, directory=True)
    except BaseException:
        cleanup()
        raise
    return cleanup


def _swap(tmp: Path, target: Path, protocol: str | None) -> Callable[[], None]:
    """Swap ``tmp`` in (under the parent lock); returns the removal of the previous save, run after the lock."""
    if protocol != "journal" and _RENAMEAT2 is not None:
        cleanup = _swap_exchange(tmp, target)
        if cleanup is not None:
            return cleanup
    if protocol == "exchange":
        raise OSError(f"renameat2(RENAME_EXCHANGE) is not available for {target}; use protocol='journal'")
    return _swap_journal(tmp, target)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, expected_bytes: int | None = None,
                     protocol: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target``; when the block ends it replaces ``target`` as a whole.

    Parameters
    ----------
    target : path-like
        The directory to create or replace (parents are created).
    expected_bytes : int, optional
        Expected size of what the block writes: checked against the free space first.
    protocol : {"exchange", "journal"}, optional
        Force one swap protocol (tests); default: exchange where the OS and
        filesystem offer it, else the journal.

    Raises
    ------
    SaveInterrupted
        On Ctrl-C: rolled back (``saved=False``) while the block or the fsync
        ran, finished (``saved=True``) once the swap had begun.
    FileExistsError
        ``target`` exists and is not a directory.
    ValueError, PermissionError, OSError
        See :func:`check_destination`; any error of the block (the save is then rolled back).

    Notes
    -----
    After a crash the target is the previous or the new complete save; the
    next :func:`atomic_directory` or :func:`read_version` cleans up.
    """
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is unknown; choose one of {', '.join(PROTOCOLS)} or None")
    target = Path(os.path.realpath(target))
    if os.path.lexists(target) and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; choose another path")
    try:
        check_destination(target, expected_bytes)
        target.parent.mkdir(parents=True, exist_ok=True)
        recover(target)
        with _parent_lock(target.parent), _sigint_deferred() as sigint:
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=tmp_prefix(target.name)))
            lock = _hold(tmp)
        if sigint.caught:
            raise KeyboardInterrupt
    except KeyboardInterrupt as exc:  # before anything was written (a stray left here is a dead one: recovered later)
        if "lock" in locals():
            _remove(tmp)
            _release(lock)
        raise SaveInterrupted(target, saved=False) from exc
    try:
        try:
            yield tmp
        except BaseException as exc:
            with _sigint_deferred():
                _remove(tmp)
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, SaveInterrupted):
                raise SaveInterrupted(target, saved=False) from exc
            raise
        swapped = False
        with _sigint_deferred() as sigint:
            try:
                publish_permissions(tmp)
                _fsync_tree(tmp)
                _fsync(target.parent, directory=True)
                if not sigint.caught:  # Ctrl-C before the swap: roll back; from here on: finish
                    with _parent_lock(target.parent):
                        cleanup = _swap(tmp, target, protocol)
                    swapped = True
                    cleanup()  # outside the parent lock: it may wait for readers of the previous save
            finally:
                if not swapped:
                    _remove(tmp)
        if sigint.caught:
            raise SaveInterrupted(target, saved=swapped)
    finally:
        _release(lock)


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented JSON (inside an :func:`atomic_directory`, which makes the whole save atomic)."""
    path.write_text(json.dumps(obj, indent=2) + "\n")
