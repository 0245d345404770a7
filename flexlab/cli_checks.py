"""What every ``flexlab`` command shares: paths checked before any work, and the error net.

Every way a command can end is one line on stderr and an exit status: 0 done, 2 bad input (or
a file-system error, naming the file), 1 an unexpected error (a bug; ``FLEXLAB_DEBUG=1`` shows
the traceback), 130 Ctrl-C, 128+N signal N. SIGTERM and SIGHUP unwind like Ctrl-C, so every
engine removes its offload files and a conversion its partial directory on the way out.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread so that every ``finally`` and ``with`` block
    runs (engines remove their offload files, a conversion its partial directory), as on Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


# ---- output paths, checked before any work --------------------------------------------------
def _probe(directory: Path, flag: str) -> None:
    """Fail now, not after the work, if nothing can be written in ``directory``."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".flexlab-probe-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {directory}: cannot write there ({e.strerror}); pass a writable place") from None


def out_dir(value: str, flag: str) -> Path:
    """An output directory, created if missing and checked writable."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {value}: is a file, not a directory; pass a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {value}: cannot create it ({e.strerror}); pass a writable directory") from None
    _probe(path, flag)
    return path


def out_file(value: str, flag: str) -> Path:
    """An output file's path: not a directory, in a writable directory (created if missing)."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise ValueError(f"{flag} {value}: is a directory; pass a file name, e.g. {Path(value) / 'out.json'}")
    out_dir(str(path.parent), flag)
    return path


def in_file(value: str, flag: str) -> Path:
    """An input file's path, which must exist and be a file."""
    path = Path(value).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ValueError(f"{flag} {value}: {what}; pass an existing file")
    return path


def read_prompts(texts: list[str] | None, prompts_file: str | None, prompt_ids: list[str] | None) -> list:
    """The prompts of ``--prompt``, ``--prompts-file`` (one per non-empty line) and ``--prompt-ids``."""
    prompts: list = list(texts or [])
    if prompts_file:
        try:
            text = in_file(prompts_file, "--prompts-file").read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--prompts-file {prompts_file}: cannot read it as text ({e})") from None
        prompts += [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    for ids in prompt_ids or []:
        try:
            prompts.append([int(t) for t in ids.split()])
        except ValueError:
            raise ValueError(
                f'--prompt-ids {ids!r}: token ids are integers separated by spaces, e.g. "2 5 6"'
            ) from None
    if not prompts:
        raise ValueError('no prompts: pass --prompt TEXT, --prompt-ids "2 5 6" or --prompts-file FILE')
    return prompts


def run_guarded(command: Callable, args) -> int:
    """``command(args)``'s exit status, with every way it can fail turned into one line."""
    with _signals_unwind():
        return _guarded(command, args)


def _guarded(command: Callable, args) -> int:
    try:
        return command(args)
    except Terminated as e:
        print(f"flexlab: stopped by {signal.Signals(e.args[0]).name}; its offload files were removed", file=sys.stderr)
        return 128 + e.args[0]
    except KeyboardInterrupt:
        print("flexlab: interrupted; its offload files were removed", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # input errors and the file system's: one clear line, no traceback
        print(f"flexlab: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: still one line, the traceback on request
        if os.environ.get("FLEXLAB_DEBUG"):
            raise
        print(
            f"flexlab: internal error: {type(e).__name__}: {_one_line(e)} (a bug; rerun with FLEXLAB_DEBUG=1 for "
            "the traceback and report it)",
            file=sys.stderr,
        )
        return 1


@contextlib.contextmanager
def _signals_unwind():
    """SIGTERM and SIGHUP raise :class:`Terminated` while the command runs (then the handlers the
    process had come back). Only the main thread may set handlers: elsewhere, nothing changes."""
    names = [n for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {n: signal.signal(getattr(signal, n), _raise_terminated) for n in names}
    try:
        yield
    finally:
        for n, handler in before.items():
            signal.signal(getattr(signal, n), handler)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    return " ".join(str(e).split()) or type(e).__name__
