"""Command-line flags that each have an environment-variable equivalent, SMARTSPEC_<FLAG>.

``add_flag(parser, "--max-batch", type=int, default=16, help=...)`` reads SMARTSPEC_MAX_BATCH when the
flag is not given on the command line, and ``--help`` shows both the variable and the default.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

ENV_PREFIX = "SMARTSPEC_"
DEFAULT_MAX_SEQUENCES = 32  # a model service's --max-sequences; `smartspec up` raises it for a larger --max-batch


def env_name(flag: str) -> str:
    """'--max-batch' -> 'SMARTSPEC_MAX_BATCH'."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _from_env(raw: str, kind: Any, action: str | None) -> Any:
    if action == "store_true":
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if action == "append":
        return [part for part in raw.split(",") if part]
    return kind(raw) if kind else raw


class _AppendReplacingDefault(argparse.Action):
    """Like action='append', but values given on the command line replace the default (which may
    come from the environment) instead of being appended to it."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        if current is None or current is self.default:
            current = []
        setattr(namespace, self.dest, [*current, values])


def add_flag(parser: argparse.ArgumentParser, flag: str, *, default: Any = None, help: str, **kwargs: Any) -> None:
    """Adds `flag` whose default comes from SMARTSPEC_<FLAG> when set, else from `default`.
    A repeatable flag (action='append') takes a comma-separated list from the environment, and any
    occurrence on the command line replaces that list."""
    name = env_name(flag)
    raw = os.environ.get(name)
    value = default if raw is None else _from_env(raw, kwargs.get("type"), kwargs.get("action"))
    if kwargs.get("action") == "append":
        kwargs["action"] = _AppendReplacingDefault
    shown = "off" if kwargs.get("action") == "store_true" and not default else default
    parser.add_argument(flag, default=value, help=f"{help} [env {name}; default: {shown}]", **kwargs)


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description)


def add_server_flags(parser: argparse.ArgumentParser, default_port: int = 0) -> None:
    """Flags every service takes: where to bind, how long to drain on shutdown, log level, tracing."""
    from smartspec.telemetry import add_trace_flags  # here: importing it at the top would be circular

    add_flag(parser, "--host", default="127.0.0.1", help="address to bind (loopback by default)")
    add_flag(parser, "--port", type=int, default=default_port, help="port to bind; 0 picks a free one (reported on stdout)")
    add_flag(parser, "--grace-s", type=float, default=5.0, help="seconds to drain in-flight calls on SIGTERM")
    add_flag(parser, "--log-level", default="INFO", help="logging level")
    add_trace_flags(parser)


def add_model_flags(parser: argparse.ArgumentParser, role: str) -> None:
    """Flags of a service that runs a model. role 'target' or 'draft' picks the flag name and default."""
    add_flag(
        parser,
        f"--{role}-model",
        default="embedded",
        help=f"{role} model: a local Hugging Face folder, or 'embedded' for the shipped default",
    )
    add_flag(parser, "--device", default="cpu", help="torch device: cpu, cuda, cuda:N or auto")
    add_flag(parser, "--dtype", default="float32", help="float32, bfloat16 or float16 (exact greedy equality is promised in float32)")
    add_flag(parser, "--max-sequences", type=int, default=DEFAULT_MAX_SEQUENCES, help="most requests whose KV cache is held at once")
    add_flag(parser, "--max-context", type=int, default=0, help="longest sequence in tokens; 0 means the model's own limit")
    add_flag(
        parser,
        "--kv-cache-gb",
        type=float,
        default=1.0,
        help="KV cache budget in GiB, allocated at start-up; capped at what --max-sequences sequences at the context limit need",
    )
