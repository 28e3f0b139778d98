"""`smartspec demo`: start the whole stack on the embedded model, generate, compare, stop.

The main job in one command: it runs `smartspec up` on a free port, sends a few prompts with the
defaults (drafter `auto`, policy `goodput`) and with speculation off, prints each completion with its
speed and acceptance, and stops the stack. The first run also converts the embedded model (~25 s) and
profiles the verifier's step cost (~30 s); both are cached.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

from smartspec.config import add_flag
from smartspec.lifeline import child_env

PROMPTS = (
    "Repeat the following text exactly, word for word:\n\nThe museum opens at nine in the morning and closes at six in the "
    "evening. Tickets cost twelve dollars for adults and six dollars for children under twelve.",
    "Write a short poem about the sea at night.",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flag(parser, "--prompt", action="append", default=[], help="prompt to send as a chat message (repeatable); default: two built-in ones")
    add_flag(parser, "--max-tokens", type=int, default=64, help="tokens to generate per prompt")
    add_flag(parser, "--startup-timeout-s", type=float, default=900.0, help="how long the stack may take to come up")


def _start_stack(timeout_s: float) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "smartspec.cli", "up", "--port", "0", "--http-port", "0"]
    # Its own session (a terminal's Ctrl-C reaches only the demo, which stops it); the stdin pipe, never
    # written, closes when the demo exits however it ends, and `up` then stops the stack.
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True, env=child_env(os.environ))
    print("starting the stack (first run: converts the embedded model and profiles the verifier, ~1 min) ...", flush=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"smartspec up exited with code {process.wait()} before it was ready (its log is above)")
        if line.startswith("ready "):
            fields = dict(part.split("=", 1) for part in line.split()[1:])
            print(line.strip(), flush=True)
            return process, fields["router"]
    process.terminate()
    raise RuntimeError(f"the stack was not ready within {timeout_s:.0f} s")


def run(args: argparse.Namespace) -> int:
    from smartspec.client import Client

    process, router = _start_stack(args.startup_timeout_s)
    try:
        with Client(router, timeout_s=600) as client:
            for prompt in args.prompt or PROMPTS:
                messages = [{"role": "user", "content": prompt}]
                print("\n" + "=" * 78 + f"\nprompt: {prompt}\n" + "-" * 78, flush=True)
                for label, options in (("auto + goodput", {}), ("no speculation", {"drafter": "none", "policy": "none"})):
                    started = time.perf_counter()
                    done = client.generate(messages=messages, max_tokens=args.max_tokens, **options)
                    seconds = time.perf_counter() - started
                    if not options:
                        print(done.text.strip() + "\n", flush=True)
                    stats = done.stats
                    print(
                        f"  {label:<15} {len(done.token_ids):>3} tokens in {seconds:5.2f} s = {len(done.token_ids) / seconds:5.1f} tok/s; "
                        f"{stats['steps']} verify steps, {stats['accepted']}/{stats['proposed']} drafts accepted ({done.finish_reason})",
                        flush=True,
                    )
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    return 0
