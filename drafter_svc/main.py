"""`smartspec serve drafter --kind KIND`: run one drafter backend behind the DrafterService.

Each backend declares its own flags; `--kind X --help` lists X's. Nothing heavy (torch) is imported
until the service is built, so the CLI stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from typing import TYPE_CHECKING, Any

from smartspec.config import add_flag, add_server_flags, env_name
from smartspec.threads import add_threads_flag, configure_threads

if TYPE_CHECKING:
    from drafter_svc.base import Drafter
    from drafter_svc.server import DrafterServicer
    from smartspec.serving import ModelThread

log = logging.getLogger("smartspec.drafter")

DEFAULT_KIND = "prompt_lookup"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_flags(parser)
    add_threads_flag(parser)
    add_flag(
        parser,
        "--kind",
        default=DEFAULT_KIND,
        help="drafter backend: a registered name (prompt_lookup, draft_model, tree, ...) or package.module:ClassName; "
        "`--kind X --help` shows X's own flags",
    )
    _add_backend_flags_on_parse(parser)


def _add_backend_flags_on_parse(parser: argparse.ArgumentParser) -> None:
    """Adds the chosen backend's flags just before `parser` parses.

    The smartspec CLI builds this parser before any argument is read, but which flags exist depends on
    --kind. So the parser's parse_known_args (which parse_args and the CLI's subcommand dispatch both go
    through, with exactly this command's arguments) first reads --kind from those arguments, then adds
    that backend's flags in their own help section.
    """
    parse_known_args = parser.parse_known_args
    kind_parser = argparse.ArgumentParser(add_help=False)
    kind_parser.add_argument("--kind", default=None)

    def parse_with_backend_flags(args=None, namespace=None):
        from drafter_svc import registry

        given = kind_parser.parse_known_args(sys.argv[1:] if args is None else list(args))[0].kind
        kind = given or os.environ.get(env_name("--kind")) or DEFAULT_KIND
        if getattr(parser, "_drafter_flags_for", None) is None:
            try:
                cls = registry.load(kind)
            except ValueError as err:
                parser.error(str(err))
            cls.add_arguments(parser.add_argument_group(f"{kind} drafter", f"flags of --kind {kind}"))
            parser._drafter_flags_for = kind
        elif parser._drafter_flags_for != kind:
            parser.error(f"this parser already has the flags of --kind {parser._drafter_flags_for}")
        return parse_known_args(args, namespace)

    parser.parse_known_args = parse_with_backend_flags


def build_servicer(kind: str, **options: Any) -> "DrafterServicer":
    """Builds the backend `kind` with keyword `options` (its constructor's arguments) and returns a
    ready DrafterServicer; used in-process by tests."""
    from drafter_svc import registry
    from smartspec.serving import ModelThread

    cls = registry.load(kind)
    thread = ModelThread(f"drafter-{kind}")
    return _servicer(thread.call(lambda: cls(**options)), thread)


def _servicer(drafter: "Drafter", thread: "ModelThread") -> "DrafterServicer":
    """`drafter` must have been built on `thread`, the one that will run it (see smartspec.serving.ModelThread)."""
    from drafter_svc.engine import DrafterEngine
    from drafter_svc.server import DrafterServicer

    return DrafterServicer(DrafterEngine(drafter), thread)


async def serve(args: argparse.Namespace) -> None:
    from drafter_svc import registry
    from drafter_svc.server import SERVICE_NAME
    from smartspec.serving import LoadedService, ModelThread, run_service
    from smartspec.telemetry import tracing_from_args
    from smartspec.wire import drafter_pb2_grpc

    cls = registry.load(args.kind)
    thread = ModelThread(f"drafter-{cls.kind}")

    async def load() -> LoadedService:
        servicer = _servicer(await thread.run(cls.from_args, args), thread)
        return LoadedService(lambda server: drafter_pb2_grpc.add_DrafterServiceServicer_to_server(servicer, server))

    try:
        tracing = tracing_from_args(args, f"smartspec-drafter-{cls.kind}")
        await run_service(cls.kind, [SERVICE_NAME], args.host, args.port, args.grace_s, load, tracing)
    finally:
        thread.close()


def run(args: argparse.Namespace) -> None:
    from smartspec.serving import setup_logging

    setup_logging(args.log_level)
    configure_threads(args.threads)
    asyncio.run(serve(args))
