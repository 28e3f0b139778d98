"""Flags and their SMARTSPEC_<FLAG> environment variables."""

from __future__ import annotations

import argparse

from smartspec.config import add_flag, env_name


def parser_with(monkeypatch, env: dict[str, str]) -> argparse.ArgumentParser:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    parser = argparse.ArgumentParser()
    add_flag(parser, "--max-batch", type=int, default=16, help="batch")
    add_flag(parser, "--stream", action="store_true", default=False, help="stream")
    add_flag(parser, "--drafter-address", action="append", default=[], help="drafters")
    return parser


def test_env_name():
    assert env_name("--max-batch") == "SMARTSPEC_MAX_BATCH"


def test_environment_supplies_defaults_and_the_command_line_wins(monkeypatch):
    parser = parser_with(monkeypatch, {"SMARTSPEC_MAX_BATCH": "4", "SMARTSPEC_STREAM": "true", "SMARTSPEC_DRAFTER_ADDRESS": "a=1,b=2"})
    args = parser.parse_args([])
    assert (args.max_batch, args.stream, args.drafter_address) == (4, True, ["a=1", "b=2"])
    args = parser.parse_args(["--max-batch", "8", "--drafter-address", "c=3", "--drafter-address", "d=4"])
    assert args.max_batch == 8 and args.drafter_address == ["c=3", "d=4"]  # replaced, not appended to the env list


def test_help_names_the_variable_and_the_default(monkeypatch):
    text = " ".join(parser_with(monkeypatch, {}).format_help().split())
    assert "[env SMARTSPEC_MAX_BATCH; default: 16]" in text and "[env SMARTSPEC_STREAM; default: off]" in text


def test_append_default_is_not_mutated(monkeypatch):
    parser = parser_with(monkeypatch, {})
    parser.parse_args(["--drafter-address", "x=1"])
    assert parser.parse_args([]).drafter_address == []
