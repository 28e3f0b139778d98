"""`smartspec serve verifier`: load the target model and serve the VerifierService."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import TYPE_CHECKING

from smartspec.config import add_model_flags, add_server_flags
from smartspec.threads import add_threads_flag, configure_threads

if TYPE_CHECKING:
    from smartspec.serving import ModelThread
    from verifier_svc.server import VerifierServicer

log = logging.getLogger("smartspec.verifier")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_flags(parser)
    add_model_flags(parser, "target")
    add_threads_flag(parser)


def build_servicer(
    model_path: str, device: str = "cpu", dtype: str = "float32", max_sequences: int = 32, max_context: int = 0, kv_cache_gb: float = 1.0
) -> "VerifierServicer":
    """Loads the target and returns a ready VerifierServicer (also used in-process by tests)."""
    from smartspec.serving import ModelThread

    thread = ModelThread("verifier-model")
    return thread.call(_load_servicer, thread, model_path, device, dtype, max_sequences, max_context, kv_cache_gb)


def _load_servicer(
    thread: "ModelThread", model_path: str, device: str, dtype: str, max_sequences: int, max_context: int, kv_cache_gb: float
) -> "VerifierServicer":
    """Runs on `thread`, the model thread (see smartspec.serving.ModelThread)."""
    from smartspec.runtime.loading import load_runner
    from verifier_svc.engine import VerifierEngine
    from verifier_svc.server import VerifierServicer

    runner, info = load_runner(model_path, "target", device, dtype, max_sequences, max_context, kv_cache_gb)
    return VerifierServicer(VerifierEngine(runner, vocab_size=info.vocab_size), info, thread)


async def serve(args: argparse.Namespace) -> None:
    from smartspec.serving import LoadedService, ModelThread, run_service, setup_logging
    from smartspec.telemetry import tracing_from_args
    from smartspec.wire import verifier_pb2_grpc
    from verifier_svc.server import SERVICE_NAME

    setup_logging(args.log_level)
    configure_threads(args.threads)  # before torch loads: its OpenMP runtime reads the variables then
    thread = ModelThread("verifier-model")

    async def load() -> LoadedService:
        servicer = await thread.run(
            _load_servicer, thread, args.target_model, args.device, args.dtype, args.max_sequences, args.max_context, args.kv_cache_gb
        )
        log.info("verifier loaded %s", servicer.model_info.model)
        return LoadedService(lambda server: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, server))

    try:
        tracing = tracing_from_args(args, "smartspec-verifier")
        await run_service("verifier", [SERVICE_NAME], args.host, args.port, args.grace_s, load, tracing)
    finally:
        thread.close()


def run(args: argparse.Namespace) -> None:
    asyncio.run(serve(args))
