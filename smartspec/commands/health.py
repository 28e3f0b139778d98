"""`smartspec health ADDRESS`: one standard gRPC health check (grpc.health.v1), for container
healthchecks and operators.

Prints the status (SERVING, or NOT_SERVING while a service loads its model or drains on shutdown) on
stdout, or, when the check itself fails, the gRPC status and message on stderr (e.g. `UNAVAILABLE: ...`
when nothing listens); exits 0 only when it is SERVING, else 1 (container engines read 1 as unhealthy).
"""

from __future__ import annotations

import argparse
import sys

from smartspec.config import add_flag

SERVING = "SERVING"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", metavar="ADDRESS", help="HOST:PORT of a smartspec service (verifier, drafter or router)")
    add_flag(parser, "--service", default="",
             help="service to check, e.g. smartspec.verifier.v1.VerifierService; empty: the server as a whole")
    add_flag(parser, "--timeout-s", type=float, default=5.0, help="deadline of the check")
    add_flag(parser, "--tls-ca", default="", help="PEM file to check a TLS service's certificate against; empty: plaintext")


def check(address: str, service: str = "", timeout_s: float = 5.0, tls_ca: str = "") -> str:
    """The health status name of `service` at `address` ('SERVING', 'NOT_SERVING', ...), or
    'CODE: details' when the check itself fails (nothing listening, unknown service, deadline)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from smartspec.client import ClientError, open_channel

    try:
        with open_channel(address, tls_ca) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as err:
        return f"{err.code().name}: {err.details()}"
    except ClientError as err:  # an unreadable --tls-ca
        return str(err)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def run(args: argparse.Namespace) -> int:
    status = check(args.address, args.service, args.timeout_s, args.tls_ca)
    failed = ":" in status  # 'CODE: details': the check itself failed
    print(status, file=sys.stderr if failed else sys.stdout, flush=True)
    return 0 if status == SERVING else 1
