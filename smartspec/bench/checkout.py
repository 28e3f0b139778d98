"""`smartspec up` from any checkout (this one, or an older one in its own worktree), for the benchmarks
that compare a change with what came before it."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from smartspec.lifeline import child_env


@contextmanager
def up_from(tree: Path, flags: Sequence[str], env: Mapping[str, str] | None = None) -> Iterator[tuple[str, float]]:
    """`smartspec up --port 0 FLAGS` of `tree`, started with this interpreter (and `env` on top of ours);
    yields the router's address and the seconds the stack took to be ready; stops it on exit."""
    environ = {**child_env(os.environ), **(env or {}), "PYTHONPATH": str(tree)}
    argv = [sys.executable, "-m", "smartspec.cli", "up", "--port", "0", *flags]
    started = time.perf_counter()
    process = subprocess.Popen(argv, cwd=tree, env=environ, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in process.stdout:
            if line.startswith("ready "):
                fields = dict(part.split("=", 1) for part in line.split()[1:])
                yield fields["router"], time.perf_counter() - started
                return
        raise RuntimeError(f"smartspec up exited with code {process.wait()} before it was ready")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=120)


def commit_of(tree: Path) -> str:
    """The tree's commit, with '-dirty' when it has changes of its own."""
    done = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def add_checkout_flags(parser: argparse.ArgumentParser, root: Path) -> None:
    """--tree and --label: which checkout's stack a before/after benchmark measures, and its name."""
    parser.add_argument("--tree", default=str(root), help="checkout whose stack is measured (default: this one)")
    parser.add_argument("--label", default="", help="name of this run in the results (default: the tree's commit)")
