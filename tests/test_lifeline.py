"""Nothing outlives its parent: `kill -9` of `smartspec up`, of `smartspec bench` and of `smartspec demo`
leaves no process of their stacks 10 s later (each child watches its parent through a pipe on its
stdin; smartspec.lifeline). Real subprocesses on the tiny models; every wait is bounded."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

SMARTSPEC = [sys.executable, "-m", "smartspec.cli"]
GONE_WITHIN_S = 10.0


def _env(**extra: str) -> dict[str, str]:
    """This environment without SMARTSPEC_* flag variables (they would change the commands' flags) and
    without thread settings (`up` then plans the threads itself)."""
    env = {
        k: v for k, v in os.environ.items()
        if (not k.startswith("SMARTSPEC_") or k == "SMARTSPEC_CACHE_DIR") and k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")
    }
    return {**env, **extra}


def _identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time) of a live, non-zombie process, or None; the start time tells a reused pid apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == "Z" else (pid, fields[19])


def _children(pid: int) -> list[int]:
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except FileNotFoundError:  # a thread that ended meanwhile
            pass
    return found


def _descendants(pid: int) -> set[tuple[int, str]]:
    """Every live process below `pid` (children, their children, ...), as (pid, start time)."""
    found: set[tuple[int, str]] = set()
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            identity = _identity(child)
            if identity is not None and identity not in found:
                found.add(identity)
                todo.append(child)
    return found


def _alive(processes: set[tuple[int, str]]) -> set[tuple[int, str]]:
    return {p for p in processes if _identity(p[0]) == p}


def _wait_for_line(process: subprocess.Popen, stream, predicate: Callable[[str], bool], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], 0.5)
        if ready:
            line = stream.readline()
            if predicate(line):
                return line
            if not line and process.poll() is not None:
                return ""
        elif process.poll() is not None:
            return ""
    return ""


def _kill_and_expect_no_survivor(process: subprocess.Popen, stack: set[tuple[int, str]], log: Path) -> None:
    """SIGKILLs `process` and checks that every process of its stack is gone within GONE_WITHIN_S."""
    try:
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + GONE_WITHIN_S
        while _alive(stack) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = _alive(stack)
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200] for pid, _ in survivors]
        assert not survivors, f"still running {GONE_WITHIN_S:.0f}s after the kill: {commands}\nlog:\n{log.read_text()[-3000:]}"
    finally:
        for pid, _ in _alive(stack):  # never leave them behind, even when the test fails
            os.kill(pid, signal.SIGKILL)


def test_kill_9_of_up_leaves_no_service(tiny_target, tiny_draft, tmp_path):
    log = tmp_path / "up.log"
    with open(log, "w") as err:
        process = subprocess.Popen(
            [*SMARTSPEC, "up", "--port", "0", "--target-model", str(tiny_target), "--draft-model", str(tiny_draft)],
            stdout=subprocess.PIPE, stderr=err, text=True, env=_env(),
        )
    line = _wait_for_line(process, process.stdout, lambda text: text.startswith("ready "), timeout_s=300)
    stack = _descendants(process.pid)
    assert line and len(stack) == 5, f"no ready line or not 5 services ({line!r}, {stack}); log:\n{log.read_text()[-3000:]}"
    for pid, _ in stack:  # while they run: each service got its thread count and the passive wait policy
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"OMP_WAIT_POLICY=PASSIVE" in environ
        assert (b"--threads" in argv) == (b"router" not in argv), argv
    _kill_and_expect_no_survivor(process, stack, log)


def test_kill_9_of_bench_leaves_no_service(tiny_target, tmp_path):
    log = tmp_path / "bench.log"
    argv = [
        *SMARTSPEC, "bench", "--out", str(tmp_path / "out"), "--target-model", str(tiny_target), "--workloads", "copy", "--drafters",
        "prompt_lookup", "--policies", "none", "fixed:3", "--rates", "20", "--requests", "40", "--max-tokens", "40",
    ]
    with open(log, "w") as err:
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=_env())
    deadline = time.monotonic() + 300
    while "stack ready" not in log.read_text() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    stack = _descendants(process.pid)
    assert "stack ready" in log.read_text() and len(stack) == 3, f"not ready or not 3 services ({stack}); log:\n{log.read_text()[-3000:]}"
    time.sleep(1.0)  # into the load: requests are in flight when it dies
    _kill_and_expect_no_survivor(process, stack, log)


def test_kill_9_of_demo_leaves_no_service(tiny_target, tiny_draft, tmp_path):
    log = tmp_path / "demo.log"
    # the demo starts `smartspec up`, which reads its models from these variables
    env = _env(SMARTSPEC_TARGET_MODEL=str(tiny_target), SMARTSPEC_DRAFT_MODEL=str(tiny_draft))
    with open(log, "w") as err:
        process = subprocess.Popen([*SMARTSPEC, "demo", "--max-tokens", "400"], stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    line = _wait_for_line(process, process.stdout, lambda text: text.startswith("ready "), timeout_s=300)
    stack = _descendants(process.pid)
    assert line and len(stack) == 6, f"no ready line or not up + 5 services ({line!r}, {stack}); log:\n{log.read_text()[-3000:]}"
    _kill_and_expect_no_survivor(process, stack, log)


def test_a_child_not_started_by_a_watching_parent_ignores_its_stdin(tmp_path):
    """A service run by hand (stdin a terminal, or /dev/null here) must not take end-of-file for its
    parent's death."""
    probe = "from smartspec.lifeline import watch_parent; import time; print(watch_parent(), flush=True); time.sleep(1.5); print('alive')"
    done = subprocess.run([sys.executable, "-c", probe], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 0 and done.stdout.split() == ["False", "alive"], done.stderr


@pytest.mark.parametrize("how", ["pipe", "death_signal", "dead_before_watching"])
def test_a_watching_child_gets_sigterm_when_its_parent_dies(tmp_path, how):
    """The mechanism alone, without a stack: a middle process starts a child with child_env and a stdin
    pipe, then is SIGKILLed; the child's SIGTERM handler runs. With 'death_signal' the pipe's write end
    is also held here, so only the parent-death signal can tell; with 'dead_before_watching' the parent
    is gone before the child starts watching, so only the parent-pid re-check can."""
    marker = tmp_path / "terminated"
    child = (
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *_: (open({str(marker)!r}, 'w').write('yes'), sys.exit(0)))\n"
        f"time.sleep({2.0 if how == 'dead_before_watching' else 0})\n"
        "from smartspec.lifeline import watch_parent\n"
        "watch_parent()\n"
        "time.sleep(30)\n"
    )
    middle = (
        "import os, subprocess, sys, time\n"
        "from smartspec.lifeline import child_env\n"
        "stdin = int(sys.argv[1]) if len(sys.argv) > 1 else subprocess.PIPE\n"
        f"p = subprocess.Popen([sys.executable, '-c', {child!r}], stdin=stdin, env=child_env(os.environ))\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(30)\n"
    )
    read_end, write_end = os.pipe()  # held open here: the child never sees end-of-file on it
    try:
        held = how != "pipe"
        argv = [sys.executable, "-c", middle, *([str(read_end)] if held else [])]
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=_env(), pass_fds=(read_end,) if held else ())
        child_pid = int(process.stdout.readline())
        if how != "dead_before_watching":
            time.sleep(1.0)  # the child is watching
        process.kill()
        process.wait(timeout=10)
        deadline = time.monotonic() + GONE_WITHIN_S
        while _identity(child_pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            assert _identity(child_pid) is None and marker.exists() and marker.read_text() == "yes"
        finally:
            if _identity(child_pid) is not None:
                os.kill(child_pid, signal.SIGKILL)
    finally:
        os.close(read_end)
        os.close(write_end)
