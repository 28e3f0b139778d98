"""`smartspec generate` and the Python client against a running router: JSON output, streaming, the
error path, environment variables, and no torch/transformers on the client side."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from smartspec.client import Client, ClientError
from smartspec.wire import router_pb2
from tests.test_router_stack import stack  # noqa: F401  (fixture)

PROMPT = "The quick brown fox jumps over the lazy dog near the river bank."


def smartspec(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SMARTSPEC_") or k == "SMARTSPEC_CACHE_DIR"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "smartspec.cli", *args], capture_output=True, text=True, timeout=timeout, env=full_env)


def test_client_side_never_imports_torch_or_transformers():
    code = (
        "import sys, smartspec.client, smartspec.commands.generate\n"
        "from smartspec.cli import build_parser\n"
        "build_parser(['generate', '--prompt', 'x']).parse_args(['generate', '--prompt', 'x'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'transformers', 'numpy'})\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_generate_json_matches_the_router(stack):
    direct = stack.stub.Generate(router_pb2.GenerateRequest(prompt=PROMPT, max_tokens=9, drafter="draft_model", policy="fixed:2"))
    out = smartspec("generate", "--router", stack.address, "--prompt", PROMPT, "--max-tokens", "9", "--drafter", "draft_model", "--policy", "fixed:2", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result) == {"token_ids", "text", "finish_reason", "stats"}
    assert result["token_ids"] == list(direct.token_ids) and result["text"] == direct.text
    assert result["finish_reason"] == "length"
    assert set(result["stats"]) == {"steps", "proposed", "accepted", "prompt_tokens", "ttft_s", "total_s", "queue_s", "seed"}
    assert result["stats"]["steps"] == direct.stats.steps and result["stats"]["proposed"] == direct.stats.proposed > 0
    assert result["stats"]["seed"] == 0  # greedy


def test_generate_ignore_eos_runs_to_max_tokens_as_the_router_does(stack):
    direct = stack.stub.Generate(router_pb2.GenerateRequest(prompt=PROMPT, max_tokens=30, policy="none", ignore_eos=True))
    out = smartspec("generate", "--router", stack.address, "--prompt", PROMPT, "--max-tokens", "30", "--policy", "none", "--ignore-eos", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == list(direct.token_ids) and len(result["token_ids"]) == 30 and result["finish_reason"] == "length"


def test_generate_samples_reproducibly_with_a_seed_and_refuses_bad_values(stack):
    args = ("generate", "--router", stack.address, "--prompt", PROMPT, "--max-tokens", "8", "--drafter", "draft_model", "--policy", "fixed:2",
            "--temperature", "1.5", "--top-k", "50", "--top-p", "0.9", "--json")
    first, second = smartspec(*args, "--seed", "11"), smartspec(*args, "--seed", "11")
    assert first.returncode == 0 == second.returncode, first.stderr
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert one["token_ids"] == two["token_ids"] and one["stats"]["seed"] == 11
    others = {tuple(json.loads(smartspec(*args, "--seed", str(seed)).stdout)["token_ids"]) for seed in (12, 13)}
    assert others - {tuple(one["token_ids"])}  # other seeds sample other text
    bad = smartspec(*args, "--top-p", "1.5")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "top_p" in bad.stderr


def test_generate_stream_prints_the_same_text(stack):
    unary = smartspec("generate", "--router", stack.address, "--prompt", PROMPT, "--max-tokens", "12", "--json")
    streamed = smartspec("generate", "--router", stack.address, "--prompt", PROMPT, "--max-tokens", "12", "--stream")
    plain = smartspec("generate", "--router", stack.address, "--prompt", PROMPT, "--max-tokens", "12")
    assert unary.returncode == streamed.returncode == plain.returncode == 0, streamed.stderr
    text = json.loads(unary.stdout)["text"]
    assert streamed.stdout == text + "\n" == plain.stdout
    assert "finish=length" in streamed.stderr and "tokens=12" in streamed.stderr
    both = smartspec("generate", "--router", stack.address, "--prompt", PROMPT, "--max-tokens", "12", "--stream", "--json")
    streamed_json, unary_json = json.loads(both.stdout), json.loads(unary.stdout)
    assert (streamed_json["token_ids"], streamed_json["text"]) == (unary_json["token_ids"], unary_json["text"])


def test_generate_error_reaches_the_user_unvalidated(stack):
    out = smartspec("generate", "--router", stack.address, "--prompt", "hi", "--max-tokens", "0", "--json")
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip() == "INVALID_ARGUMENT: max_tokens must be at least 1 (got 0)"
    out = smartspec("generate", "--router", stack.address, "--prompt", "hi", "--policy", "fixed:x", "--stream")
    assert out.returncode != 0 and out.stderr.strip().splitlines()[-1].startswith("INVALID_ARGUMENT: policy 'fixed:x'")


def test_generate_reports_an_unreachable_router():
    out = smartspec("generate", "--router", "127.0.0.1:1", "--prompt", "hi", "--timeout-s", "5")
    assert out.returncode != 0 and out.stderr.startswith("UNAVAILABLE: ")


def test_every_flag_has_an_environment_variable(stack):
    env = {"SMARTSPEC_ROUTER": stack.address, "SMARTSPEC_PROMPT": PROMPT, "SMARTSPEC_MAX_TOKENS": "3", "SMARTSPEC_JSON": "1",
           "SMARTSPEC_DRAFTER": "none", "SMARTSPEC_STOP": "zzz,yyy"}
    out = smartspec("generate", env=env)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["token_ids"]) == 3 and result["stats"]["proposed"] == 0
    helptext = smartspec("generate", "--help").stdout
    for flag in ("--prompt", "--drafter", "--policy", "--max-tokens", "--stop", "--router", "--json", "--stream"):
        assert flag in helptext
    flat = " ".join(helptext.split())
    assert "env SMARTSPEC_MAX_TOKENS" in flat and "default: 127.0.0.1:50051" in flat


def test_python_client(stack):
    with Client(stack.address, timeout_s=60) as client:
        done = client.generate(PROMPT, max_tokens=10, drafter="self_draft", policy="fixed:3")
        assert len(done.token_ids) == 10 and done.finish_reason == "length" and done.stats["accepted"] > 0
        chunks = list(client.generate_stream(PROMPT, max_tokens=10, drafter="self_draft", policy="fixed:3"))
        assert [t for c in chunks for t in c.token_ids] == done.token_ids and "".join(c.text for c in chunks) == done.text
        assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])
        chat = client.generate(messages=[{"role": "user", "content": "hi"}], max_tokens=4, drafter="none")
        assert len(chat.token_ids) == 4
        with pytest.raises(ClientError) as info:
            client.generate("hi", max_tokens=0)
        assert info.value.status == "INVALID_ARGUMENT" and info.value.message.startswith("max_tokens must be at least 1")
        assert str(info.value).startswith("INVALID_ARGUMENT: max_tokens")
        with pytest.raises(ClientError) as info:
            list(client.generate_stream("hi", drafter="nope"))
        assert info.value.status == "INVALID_ARGUMENT"
        # closing a stream early cancels the request; the router keeps serving
        stream = client.generate_stream(PROMPT, max_tokens=300, policy="none", drafter="none")
        next(stream)
        stream.close()
        assert len(client.generate("again", max_tokens=2).token_ids) == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--router", "127.0.0.1:1", "--prompt", "hi", "--timeout-s", "5"],
        ["generate", "--router", "127.0.0.1:1", "--prompt", "hi", "--timeout-s", "5", "--stream"],
        ["generate", "--router", "127.0.0.1:1", "--prompt", "hi", "--timeout-s", "5", "--json"],
        ["health", "127.0.0.1:1", "--timeout-s", "3"],
        ["bench", "--router", "127.0.0.1:1", "--quick", "--out", "{tmp}"],
    ],
    ids=["generate", "generate-stream", "generate-json", "health", "bench"],
)
def test_every_command_that_calls_a_service_reports_its_status_on_stderr(argv, tmp_path):
    out = smartspec(*(arg.format(tmp=tmp_path / "bench") for arg in argv), timeout=120)
    assert out.returncode != 0
    assert "UNAVAILABLE: failed to connect" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert "UNAVAILABLE" not in out.stdout


def test_an_unhandled_failed_call_ends_the_command_with_its_status(monkeypatch, capsys):
    """Whatever a command leaves uncaught from a call to a service becomes 'STATUS: message' and exit 1."""
    import types

    import grpc

    from smartspec import cli

    class Refused(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.PERMISSION_DENIED

        def details(self):
            return "not for you"

    def fail(error: Exception):
        def run(args):
            raise error

        return run

    for error, line in ((Refused(), "PERMISSION_DENIED: not for you"), (ClientError("UNAVAILABLE", "gone"), "UNAVAILABLE: gone")):
        module = types.SimpleNamespace(add_arguments=lambda parser: None, run=fail(error))
        monkeypatch.setitem(sys.modules, "fake_command", module)
        monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_command", "a command that fails"))
        assert cli.main(["fake"]) == 1
        assert capsys.readouterr().err.strip() == line
    module = types.SimpleNamespace(add_arguments=lambda parser: None, run=fail(KeyError("a bug")))
    monkeypatch.setitem(sys.modules, "fake_command", module)
    with pytest.raises(KeyError):  # anything else is a bug, and keeps its traceback
        cli.main(["fake"])
