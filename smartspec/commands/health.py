"""`smartspec health ADDRESS`: one standard gRPC health check (grpc.health.v1), for container
healthchecks and operators.

Prints the status (SERVING, NOT_SERVING while a service loads its model or drains on shutdown, or the
error, e.g. `UNAVAILABLE: ...` when nothing listens) and exits 0 only when it is SERVING, else 1
(container engines read 1 as unhealthy).
"""

from __future__ import annotations

import argparse

from smartspec.config import add_flag

SERVING = "SERVING"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDRESS", help="HOST:PORT of a smartspec service (verifier, drafter or router)")
    add_flag(parser, "--service", default="",
             help="service to check, e.g. smartspec.verifier.v1.VerifierService; empty: the server as a whole")
    add_flag(parser, "--timeout-s", type=float, default=5.0, help="deadline of the check")


def check(address: str, service: str = "", timeout_s: float = 5.0) -> str:
    """The health status name of `service` at `address` ('SERVING', 'NOT_SERVING', ...), or
    'CODE: details' when the check itself fails (nothing listening, unknown service, deadline)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as err:
        return f"{err.code().name}: {err.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def run(args: argparse.Namespace) -> int:
    status = check(args.address, args.service, args.timeout_s)
    print(status, flush=True)
    return 0 if status == SERVING else 1
