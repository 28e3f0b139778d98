"""A child process that ends with its parent, even when the parent is SIGKILLed.

`smartspec up`, `bench` and `demo` start their services as child processes in their own process groups
(so a terminal's Ctrl-C reaches only the parent, which orders the shutdown). Nothing would then end a
child whose parent died without stopping it: it would be re-parented to init and keep its CPU and ports.

The parent gives each child a pipe on stdin that it never writes to, and names itself in the child's
environment (`child_env`). The child (`watch_parent`, run by the CLI at startup) reads stdin on a
daemon thread: end-of-file means the parent is gone, whatever killed it (the kernel closes the pipe's
write end when the parent exits), and the child sends itself SIGTERM, taking its normal graceful path.
Linux's parent-death signal is a backup only: it fires when the *thread* that forked the child exits,
and not at all if the parent died before the child asked for it, hence the parent-pid re-check.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
from typing import Mapping

log = logging.getLogger("smartspec.lifeline")

# Set by the parent in the child's environment: the parent's pid. Removed by the child on reading it,
# so that processes the child starts in turn only watch it when it asks them to.
PARENT_ENV = "SMARTSPEC_LIFELINE_PARENT"
_PR_SET_PDEATHSIG = 1


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` plus what makes the child watch this process. Start the child with stdin=PIPE (and keep
    the pipe open, unwritten, for as long as the child should live)."""
    return {**env, PARENT_ENV: str(os.getpid())}


def watch_parent() -> bool:
    """In a child started with `child_env` and a stdin pipe: SIGTERM this process when the parent is
    gone. Returns whether this process is watching (False when it was not started that way)."""
    raw = os.environ.pop(PARENT_ENV, None)
    if raw is None:
        return False
    try:
        parent = int(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not a process id", PARENT_ENV, raw)
        return False
    threading.Thread(target=_wait_for_eof, name="lifeline", daemon=True).start()
    _set_parent_death_signal()
    if os.getppid() != parent:  # it died before the signal was asked for (the pipe catches it too)
        _parent_gone()
    return True


def _wait_for_eof() -> None:
    """Blocks on stdin until end-of-file (or an error reading it): the parent's end is closed."""
    try:
        while os.read(0, 4096):
            pass  # the parent never writes; anything that arrives is ignored
    except (OSError, ValueError):
        pass
    _parent_gone()


def _parent_gone() -> None:
    log.warning("parent process gone: stopping")
    os.kill(os.getpid(), signal.SIGTERM)


def _set_parent_death_signal() -> None:
    """Linux only: the kernel sends SIGTERM when the parent (its forking thread) exits."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    except (OSError, AttributeError):
        pass  # no prctl: the stdin pipe alone watches the parent
