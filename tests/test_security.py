"""Loopback by default, optional TLS and bearer token on the router (in process and as a real
`smartspec serve router`), the client and CLI sides of both, and explicit message size limits. The
certificate is made at test time, for 127.0.0.1, and never stored."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from router.server import SERVICE_NAME as ROUTER_SERVICE
from smartspec.client import Client, ClientError, open_channel
from smartspec.commands.health import check
from smartspec.security import ServerSecurity
from smartspec.serving import MAX_MESSAGE_BYTES
from smartspec.wire import router_pb2, router_pb2_grpc
from tests.test_cli_generate import smartspec
from tests.test_router_stack import RouterThread, tokenizer_for, verifier_for, wait_until
from tests.test_service_lifecycle import serve

TOKEN = "s3cret-token"
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 and localhost, and its key."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.fixture(scope="module")
def secure_router(tiny_target, certificate):
    cert, key = certificate
    router = RouterThread(tokenizer_for(str(tiny_target)), verifier_for(str(tiny_target)).address, {}, drafter="none", cost_profile="off",
                          security=ServerSecurity(str(cert), str(key), TOKEN))
    yield router
    router.stop()


@pytest.fixture(scope="module")
def plain_router(tiny_target):
    router = RouterThread(tokenizer_for(str(tiny_target)), verifier_for(str(tiny_target)).address, {}, drafter="none", cost_profile="off")
    yield router
    router.stop()


def _listening_hosts(port: int) -> set[str]:
    """Local addresses with a listening TCP socket on `port` (Linux /proc/net)."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
                if len(raw) == 4:
                    hosts.add(str(ipaddress.IPv4Address(raw[::-1])))
                else:
                    ip = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
                    hosts.add(str(ip.ipv4_mapped or ip))
    return hosts


def test_every_service_binds_loopback_by_default(tmp_path):
    from smartspec.cli import build_parser

    for argv in (["serve", "router"], ["serve", "verifier"], ["serve", "drafter"], ["up"]):
        assert build_parser(argv).parse_args(argv).host == "127.0.0.1", argv
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc/net/tcp to see what a socket is bound to")
    with serve(["drafter", "--kind", "prompt_lookup", "--port", "0"], tmp_path / "drafter.log") as (_, address):
        assert address.startswith("127.0.0.1:")
        assert _listening_hosts(int(address.rsplit(":", 1)[1])) == {"127.0.0.1"}


def test_tls_and_bearer_token(secure_router, certificate):
    cert, _ = certificate
    address = secure_router.address
    with Client(address, timeout_s=30, tls_ca=str(cert), auth_token=TOKEN) as client:
        assert len(client.generate(PROMPT, max_tokens=3).token_ids) == 3
        assert sum(len(c.token_ids) for c in client.generate_stream(PROMPT, max_tokens=3)) == 3
    for token, message in ((None, "requires a bearer token"), ("guess", "the bearer token is wrong")):
        with Client(address, timeout_s=30, tls_ca=str(cert), auth_token=token) as client:
            for call in (lambda: client.generate(PROMPT, max_tokens=3), lambda: list(client.generate_stream(PROMPT, max_tokens=3))):
                with pytest.raises(ClientError) as info:
                    call()
                assert info.value.status == "UNAUTHENTICATED" and message in info.value.message
    # health checks stay open (for balancers and `smartspec health`); everything else needs the token
    assert check(address, tls_ca=str(cert)) == "SERVING" and check(address, ROUTER_SERVICE, tls_ca=str(cert)) == "SERVING"
    with open_channel(address, str(cert)) as channel:
        stats = router_pb2_grpc.RouterServiceStub(channel).Stats
        with pytest.raises(grpc.RpcError) as info:
            stats(router_pb2.StatsRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stats(router_pb2.StatsRequest(), timeout=10, metadata=(("authorization", f"Bearer {TOKEN}"),)).steps >= 0
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        with pytest.raises(grpc.RpcError) as info:
            list(reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # without TLS the router cannot be reached at all; a missing CA file is the caller's error
    with Client(address, timeout_s=5, auth_token=TOKEN) as client, pytest.raises(ClientError) as info:
        client.generate(PROMPT, max_tokens=3)
    assert info.value.status == "UNAVAILABLE"
    with pytest.raises(ClientError) as info:
        Client(address, tls_ca=str(cert) + ".missing")
    assert info.value.status == "INVALID_ARGUMENT" and "cannot read the TLS CA file" in info.value.message


def test_security_settings_are_checked_at_startup(tmp_path):
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        ServerSecurity(tls_cert="cert.pem")
    with pytest.raises(ValueError, match="--tls-cert .*missing.pem"):
        ServerSecurity(str(tmp_path / "missing.pem"), str(tmp_path / "missing.key")).credentials()
    assert ServerSecurity().credentials() is None and ServerSecurity().interceptors() == []


def test_router_process_with_tls_and_token_and_the_cli(tiny_target, certificate, tmp_path):
    cert, key = certificate
    verifier = verifier_for(str(tiny_target))
    argv = ["router", "--port", "0", "--verifier", verifier.address, "--target-model", str(tiny_target), "--default-drafter", "none",
            "--cost-profile", "off", "--tls-cert", str(cert), "--tls-key", str(key), "--auth-token", TOKEN]
    with serve(argv, tmp_path / "router.log", timeout_s=120) as (_, address):
        assert wait_until(lambda: check(address, tls_ca=str(cert), timeout_s=2) == "SERVING", timeout=120), (tmp_path / "router.log").read_text()[-3000:]
        ok = smartspec("generate", "--router", address, "--tls-ca", str(cert), "--prompt", PROMPT, "--max-tokens", "3", "--json",
                       env={"SMARTSPEC_AUTH_TOKEN": TOKEN})
        assert ok.returncode == 0 and '"finish_reason": "length"' in ok.stdout, ok.stderr
        refused = smartspec("generate", "--router", address, "--tls-ca", str(cert), "--prompt", PROMPT, "--max-tokens", "3")
        assert refused.returncode == 1 and refused.stdout.strip() == ""
        assert refused.stderr.startswith("UNAUTHENTICATED: this router requires a bearer token"), refused.stderr
        health = smartspec("health", address, "--tls-ca", str(cert))
        assert (health.returncode, health.stdout.strip()) == (0, "SERVING"), health.stderr


def test_oversized_request_is_resource_exhausted_and_long_prompts_are_refused_before_tokenizing(plain_router):
    options = [("grpc.max_send_message_length", 2 * MAX_MESSAGE_BYTES)]  # a client that does not check sizes itself
    with grpc.insecure_channel(plain_router.address, options=options) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(router_pb2.GenerateRequest(prompt="x" * (MAX_MESSAGE_BYTES + 1024)), timeout=60)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in info.value.details()
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(router_pb2.GenerateRequest(prompt="hello " * 1_000_000), timeout=60)
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE and "6000000 characters" in info.value.details()
        assert time.monotonic() - started < 5  # not tokenized (that alone takes seconds)
        assert len(stub.Generate(router_pb2.GenerateRequest(prompt=PROMPT, max_tokens=2), timeout=30).token_ids) == 2
    with Client(plain_router.address, timeout_s=60) as client, pytest.raises(ClientError) as err:
        client.generate("x" * (MAX_MESSAGE_BYTES + 1024))
    assert err.value.status == "RESOURCE_EXHAUSTED"  # the client's own limit, before sending
