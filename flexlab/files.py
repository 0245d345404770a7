"""Files flexlab writes: atomically, and in directories it owns, which go away on every way out.

:func:`atomic_path` (and :func:`atomic_write`) writes a result file under a temporary name and
renames it into place, so a crash or an interrupt never leaves half a file.

flexlab writes large scratch data (offload files, a checkpoint being converted, a model being
trained) into directories of its own. Each is made by :func:`owned_dir`, which writes an owner
mark (host, PID and the process's start time, so a reused PID is not mistaken for the owner)
and registers the directory for removal:

* on a normal exit (``atexit``), also when an Engine was never closed;
* on SIGTERM or SIGHUP, when the process has no handler of its own for them: the directories
  are removed, then the signal is delivered as before (the process still dies of it);
* by a later process, when the owner died without any of that (``kill -9``, a power cut):
  :func:`sweep_stale` removes marked directories whose owner is no longer alive.

Ctrl-C needs nothing here: it raises ``KeyboardInterrupt``, and the owners' ``finally`` blocks
remove their directories. The registry below is the one piece of process-wide state in flexlab:
signal handlers and exit hooks belong to the process, not to an object.

    >>> import tempfile
    >>> d = owned_dir(tempfile.gettempdir(), "flexlab-doctest-")
    >>> (d / OWNER_FILE).exists(), is_stale(d)
    (True, False)
    >>> atomic_write(d / "result.json", "{}"); sorted(p.name for p in d.iterdir())
    ['.flexlab-owner', 'result.json']
    >>> remove(d); d.exists()
    False
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

OWNER_FILE = ".flexlab-owner"
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))

_live: set[Path] = set()  # directories of this process still to remove (see the module docstring)
_lock = threading.Lock()
_exit_hook = _signal_hooks = False


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed to ``path`` when the block ends
    without an error, deleted otherwise. The parent directory is created if missing.

    Used for writers that want a file name (``DataFrame.to_csv``, ``Figure.savefig``); the
    temporary name keeps ``path``'s suffix, from which such writers infer the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name before ")" may hold spaces


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def owned_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A new directory in ``parent`` named ``prefix...``, marked as this process's and removed
    when it exits or is terminated (see the module docstring). Remove it with :func:`remove`."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    mark = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}
    (path / OWNER_FILE).write_text(json.dumps(mark))
    with _lock:
        _live.add(path)
    _install_hooks()
    return path


def disown(path: Path) -> None:
    """Keep ``path`` from now on (e.g. renamed into place as a finished result): drop its mark
    and its registration."""
    (path / OWNER_FILE).unlink(missing_ok=True)
    with _lock:
        _live.discard(path)


def remove(path: Path) -> None:
    """Delete an owned directory and everything in it."""
    shutil.rmtree(path, ignore_errors=True)
    with _lock:
        _live.discard(path)


def is_stale(path: Path) -> bool:
    """Whether ``path`` carries an owner mark of this host whose process is gone."""
    try:
        mark = json.loads((path / OWNER_FILE).read_text())
        host, pid, start = mark["host"], int(mark["pid"]), mark.get("start")
    except (OSError, ValueError, KeyError, TypeError):
        return False  # unmarked (or being written): not ours to judge
    if host != socket.gethostname():
        return False  # a process on another machine sharing the disk
    if not _alive(pid):
        return True
    return start is not None and _start_time(pid) not in (None, start)  # the PID was reused


def sweep_stale(parent: str | os.PathLike, prefix: str) -> list[Path]:
    """Remove the directories ``prefix*`` in ``parent`` whose owner died; returns them."""
    swept: list[Path] = []
    try:
        candidates = [p for p in Path(parent).iterdir() if p.name.startswith(prefix) and p.is_dir()]
    except OSError:
        return swept
    for path in candidates:
        if is_stale(path):
            shutil.rmtree(path, ignore_errors=True)
            swept.append(path)
    return swept


def _remove_all() -> None:
    with _lock:
        paths = list(_live)
        _live.clear()
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def _on_signal(signum, frame) -> None:
    _remove_all()
    signal.signal(signum, signal.SIG_DFL)  # then die of the signal, as without this handler
    os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    """The exit hook, once; the signal handlers once from the main thread (only it may set them),
    where the default (die at once, leaving the files) is in force. A handler the program set
    itself is left alone: it decides what a signal means (flexlab's CLI raises an exception that
    unwinds through every owner's cleanup)."""
    global _exit_hook, _signal_hooks
    if not _exit_hook:
        _exit_hook = True
        atexit.register(_remove_all)
    if _signal_hooks or threading.current_thread() is not threading.main_thread():
        return
    _signal_hooks = True
    for sig in _SIGNALS:
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _on_signal)
