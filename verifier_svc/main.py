"""`smartspec serve verifier`: load the target model and serve the VerifierService."""

from __future__ import annotations

import argparse
import asyncio
import logging

from smartspec.config import add_model_flags, add_server_flags

log = logging.getLogger("smartspec.verifier")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_flags(parser)
    add_model_flags(parser, "target")


def build_servicer(model_path: str, device: str = "cpu", dtype: str = "float32", max_sequences: int = 32, max_context: int = 0):
    """Loads the target and returns a ready VerifierServicer (also used in-process by tests)."""
    from smartspec.runtime.loading import load_runner
    from smartspec.serving import ModelThread
    from verifier_svc.engine import VerifierEngine
    from verifier_svc.server import VerifierServicer

    thread = ModelThread("verifier-model")
    runner, info = thread.call(load_runner, model_path, "target", device, dtype, max_sequences, max_context)
    return VerifierServicer(VerifierEngine(runner, vocab_size=info.vocab_size), info, thread)


async def serve(args: argparse.Namespace) -> None:
    from smartspec.serving import announce, serve_until_signal, setup_logging, start_server
    from smartspec.wire import verifier_pb2_grpc
    from verifier_svc.server import SERVICE_NAME

    setup_logging(args.log_level)
    servicer = build_servicer(args.target_model, args.device, args.dtype, args.max_sequences, args.max_context)
    running = await start_server(
        lambda server: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, server), [SERVICE_NAME], args.host, args.port
    )
    log.info("verifier serving %s on %s", servicer.model_info.model, running.address)
    announce("verifier", running)
    await serve_until_signal(running, args.grace_s)
    servicer.thread.close()


def run(args: argparse.Namespace) -> None:
    asyncio.run(serve(args))
