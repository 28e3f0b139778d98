"""The CLI that deployment files are checked against (docker-compose.yml, deploy/kubernetes): a service's
command line parsed by the real parser inside its environment, the flags a command has, and the flags
`smartspec up` gives each service it starts."""

from __future__ import annotations

import argparse
import os
from typing import Mapping, Sequence

import pytest

from smartspec.cli import build_parser
from smartspec.commands.up import router_argv, service_argvs, stack_options
from smartspec.config import ENV_PREFIX, env_name

# SMARTSPEC_* variables that are not flags (documented in docs/cli.md).
NOT_FLAGS = {"SMARTSPEC_CACHE_DIR"}


def parse_service(argv: Sequence[str], env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """`smartspec ARGV` parsed by the real CLI parser with exactly `env`'s SMARTSPEC_* variables set
    (flags read their defaults from them)."""
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = list(argv)
    try:
        return build_parser(argv).parse_args(argv)
    except SystemExit:
        pytest.fail(f"`smartspec {' '.join(argv)}` is not a valid command (see the usage error above)")


def flags(args: argparse.Namespace) -> set[str]:
    """Every --flag of the command that parsed `args`."""
    return {option for action in args._parser._actions for option in action.option_strings if option.startswith("--")}


def up_flags(redis_url: str) -> dict[str, set[str]]:
    """The --flags `smartspec up` gives each service, by role (verifier, prompt_lookup, draft_model,
    tree, router)."""
    up = stack_options(redis_url=redis_url)
    children = service_argvs(up, "target", "draft")
    children["router"] = router_argv(up, "target", {role: "host:1" for role in children})
    return {role: {part for part in argv if part.startswith("--")} for role, argv in children.items()}


def given_flags(argv: Sequence[str], env: Mapping[str, str], args: argparse.Namespace) -> set[str]:
    """The flags a service sets: on its command line, or through their SMARTSPEC_* variables."""
    return {part.split("=", 1)[0] for part in argv if part.startswith("--")} | {flag for flag in flags(args) if env_name(flag) in env}
