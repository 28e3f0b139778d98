"""The OpenAI-compatible HTTP API, driven by the real `openai` client: completions and chat, streamed
and not, output equal to the gRPC path and to `smartspec generate`, the field rules, errors raised as
the client's own exception classes, the bearer token and TLS, overload, clients that disconnect, and a
shutdown that open streams do not hold up. Routers run in process on the tiny models (see
tests/test_router_stack.py); one test runs a real `smartspec serve router` process."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import ssl
import threading
import time
import urllib.request

import openai
import pytest

from router.http import Backend, HttpFrontend
from router.http.schemas import ChatCompletionRequest, CompletionRequest
from router.metrics import RouterMetrics
from router.request import Params, RequestState
from router.policy import PolicyRegistry
from router.telemetry import RouterTelemetry
from smartspec.security import ServerSecurity
from smartspec.wire import router_pb2
from tests.test_cli_generate import smartspec
from tests.test_router_behaviour import gated  # noqa: F401  (fixture)
from tests.test_router_stack import (
    RouterThread,
    ScriptedDrafter,
    real_drafters,
    serve_drafter,
    tokenizer_for,
    verifier_for,
    verifier_live,
    wait_until,
)
from tests.test_security import certificate  # noqa: F401  (fixture)
from tests.test_service_lifecycle import serve

MODEL = "tiny-target"
PROMPT = "The quick brown fox jumps over the lazy dog near the river bank."
QUESTION = "Name three colours."


class Api:
    """An HTTP front end on a router's own loop (as in `smartspec serve router --http-port 0`)."""

    def __init__(self, router: RouterThread | None, security: ServerSecurity | None = None, **options) -> None:
        self.router = router
        self.backend = Backend(MODEL)
        self.loop_owner = router or _LoopOnly()
        self.frontend = HttpFrontend(self.backend, "127.0.0.1", 0, security, **options)
        self.loop_owner.call(self.frontend.start())
        if router is not None:
            self.backend.attach(router.servicer, root="/models/tiny-target")
        self.base_url = f"{self.frontend.scheme}://{self.frontend.address}"

    def client(self, **options) -> openai.OpenAI:
        options.setdefault("api_key", "unused")
        options.setdefault("max_retries", 0)
        options.setdefault("timeout", 60)
        return openai.OpenAI(base_url=self.base_url + "/v1", **options)

    def get(self, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
        return request("GET", self.base_url + path, headers=headers)

    def stop(self) -> None:
        self.loop_owner.call(self.frontend.stop())


class _LoopOnly:
    """An event loop for a front end without a router (one that is still loading)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def call(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=timeout)


def request(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a plain HTTP request, errors included."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def metrics_telemetry() -> RouterTelemetry:
    return RouterTelemetry(metrics=RouterMetrics("smartspec-router"))


@pytest.fixture(scope="module")
def router(tiny_target, tiny_draft):
    """A router in front of the tiny verifier and the real drafters, with metrics."""
    verifier = verifier_for(str(tiny_target))
    router = RouterThread(tokenizer_for(str(tiny_target)), verifier.address, real_drafters(str(tiny_target), str(tiny_draft)),
                          telemetry=metrics_telemetry())
    yield router
    router.stop()


@pytest.fixture(scope="module")
def api(router):
    api = Api(router)
    yield api
    api.stop()


def greedy(**fields) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(temperature=0.0, **fields)


def extras(drafter: str, policy: str) -> dict:
    return {"drafter": drafter, "speculation_policy": policy}


# --- models, health, metrics ----------------------------------------------------------------------------
def test_models_health_and_metrics(api, router):
    (model,) = api.client().models.list().data
    assert (model.id, model.object, model.owned_by, model.root) == (MODEL, "model", "smartspec", "/models/tiny-target")
    assert abs(model.created - time.time()) < 3600
    assert model.model_extra["max_model_len"] == router.servicer.validate.max_context
    status, _, body = api.get("/health")
    assert status == 200 and json.loads(body)["status"] == "SERVING"
    api.client().completions.create(model=MODEL, prompt="metrics", max_tokens=2, temperature=0)
    status, headers, body = api.get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert 'smartspec_router_requests_total{finish_reason="length",status="OK"}' in body.decode()


# --- completions and chat: the same output as the gRPC path -----------------------------------------------
@pytest.mark.parametrize("drafter, policy", [("none", "none"), ("draft_model", "fixed:2"), ("prompt_lookup", "goodput"), ("self_draft", "fixed:4")])
def test_completion_equals_the_grpc_output(api, router, drafter, policy):
    grpc_reply = router.stub.Generate(greedy(prompt=PROMPT, max_tokens=12, drafter=drafter, policy=policy))
    done = api.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=extras(drafter, policy))
    (choice,) = done.choices
    assert choice.text == grpc_reply.text and choice.finish_reason == "length"
    assert done.object == "text_completion" and done.model == MODEL and done.id.startswith("cmpl-")
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (grpc_reply.stats.prompt_tokens, 12)
    assert done.usage.total_tokens == grpc_reply.stats.prompt_tokens + 12
    speculation = done.model_extra["speculation"]
    if policy.startswith("fixed"):  # deterministic: the same drafts are proposed and accepted
        assert (speculation["proposed"], speculation["accepted"]) == (grpc_reply.stats.proposed, grpc_reply.stats.accepted)
        assert speculation["proposed"] > 0
    if drafter == "none":
        assert speculation == {"steps": 11, "proposed": 0, "accepted": 0}


def test_completion_and_chat_equal_smartspec_generate(api, router):
    cli = smartspec("generate", "--router", router.address, "--prompt", PROMPT, "--max-tokens", "10", "--drafter", "draft_model", "--json")
    assert cli.returncode == 0, cli.stderr
    done = api.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"drafter": "draft_model"})
    assert done.choices[0].text == json.loads(cli.stdout)["text"]
    cli = smartspec("generate", "--router", router.address, "--prompt", QUESTION, "--chat", "--max-tokens", "10", "--json")
    assert cli.returncode == 0, cli.stderr
    chat = api.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_completion_tokens=10, temperature=0)
    assert chat.choices[0].message.content == json.loads(cli.stdout)["text"]
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    assert chat.usage.completion_tokens == 10


def test_streamed_completion_sends_the_first_token_first_and_equals_the_unary_one(api, router):
    grpc_chunks = list(router.stub.GenerateStream(greedy(prompt=PROMPT, max_tokens=16, drafter="none")))
    assert grpc_chunks[0].text, "precondition: the prompt's first token has text"
    unary = api.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"drafter": "none"})
    stream = api.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"drafter": "none"},
                                              stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].text == grpc_chunks[0].text  # the first event carries the first token
    assert len(with_choices) == len(grpc_chunks)  # one event per committed step, nothing empty before
    assert "".join(c.choices[0].text for c in with_choices) == unary.choices[0].text
    assert [c.choices[0].finish_reason for c in with_choices] == [None] * (len(with_choices) - 1) + ["length"]
    assert with_choices[-1].model_extra["speculation"]["steps"] == 15
    usage = chunks[-1]
    assert usage.choices == [] and (usage.usage.completion_tokens, usage.usage.prompt_tokens) == (16, unary.usage.prompt_tokens)
    without_usage = list(api.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    assert all(c.choices and c.usage is None for c in without_usage)


def test_streamed_chat_with_text_parts_equals_the_unary_one(api, router):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTION}]
    parts = [messages[0], {"role": "user", "content": [{"type": "text", "text": QUESTION}]}]
    grpc_chunks = list(router.stub.GenerateStream(greedy(
        messages=[router_pb2.ChatMessage(**m) for m in messages], max_tokens=12, drafter="prompt_lookup", policy="fixed:3")))
    client = api.client()
    unary = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, extra_body=extras("prompt_lookup", "fixed:3"))
    assert unary.choices[0].message.content == "".join(c.text for c in grpc_chunks)
    stream = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body=extras("prompt_lookup", "fixed:3"))
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant" and deltas[0].content == grpc_chunks[0].text
    assert all(d.role is None for d in deltas[1:])
    assert "".join(d.content for d in deltas) == unary.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens == 12
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_stop_seed_and_neutral_fields(api, router):
    client = api.client()
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = full[5:8]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stop=stop)
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"
    # sampling with a seed reproduces (a fixed drafter and policy); unset temperature means 1, as in the OpenAI API
    sampled = [client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, seed=7, top_p=0.9, extra_body={**extras("draft_model", "fixed:2"), "top_k": 50})
               for _ in range(2)]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text
    others = {client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, seed=s).choices[0].text for s in (8, 9, 10)}
    assert len(others | {full}) > 1, "temperature 1 by default: seeds sample different text"
    # fields smartspec does not implement are accepted at their neutral values; unknown ones are ignored; null is absent
    neutral = client.completions.create(
        model=MODEL, prompt=[PROMPT], max_tokens=20, temperature=0, n=1, presence_penalty=0, frequency_penalty=0.0, logprobs=None,
        echo=False, best_of=1, logit_bias={}, extra_body={"repetition_penalty": 1.0, "top_k": -1, "min_p": 0.0, "made_up": {"x": 1}, "seed": None},
    )
    assert neutral.choices[0].text == full
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
                                          max_tokens=5, temperature=0, logprobs=False, tools=[], response_format={"type": "text"}, top_logprobs=0)
    assert chat.usage.completion_tokens == 5


@pytest.mark.parametrize(
    "endpoint, fields, param, words",
    [
        ("completions", dict(n=2), "n", "n must be 1"),
        ("completions", dict(logprobs=2), "logprobs", "does not implement logprobs"),
        ("completions", dict(echo=True, suffix="x"), "echo", "echo, suffix"),
        ("completions", dict(best_of=3), "best_of", "best_of"),
        ("completions", dict(presence_penalty=0.5, logit_bias={"5": 1}), "presence_penalty", "presence_penalty, logit_bias"),
        ("completions", dict(extra_body={"repetition_penalty": 1.2}), "repetition_penalty", "repetition_penalty"),
        ("completions", dict(prompt=["one", "two"]), "prompt", "list prompts are not supported"),
        ("completions", dict(prompt=[1, 2, 3]), "prompt", "token-id prompts"),
        ("completions", dict(max_tokens=0), "max_tokens", "max_tokens must be at least 1 (got 0)"),
        ("completions", dict(temperature=-1), "temperature", "temperature must be a finite number >= 0"),
        ("completions", dict(temperature=1, top_p=1.5), "top_p", "top_p must be in (0, 1]"),
        ("completions", dict(stop=[""]), "stop", "stop sequences must not be empty"),
        ("completions", dict(extra_body={"speculation_policy": "bogus"}), "speculation_policy", "unknown policy 'bogus'"),
        ("completions", dict(extra_body={"drafter": "nope"}), "drafter", "drafter 'nope' is unknown"),
        ("completions", dict(prompt=""), "prompt", "the prompt is empty"),
        ("chat", dict(logprobs=True, top_logprobs=2), "logprobs", "logprobs, top_logprobs"),
        ("chat", dict(n=3), "n", "n must be 1"),
        ("chat", dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools", "does not implement tools"),
        ("chat", dict(response_format={"type": "json_object"}), "response_format", "response_format"),
        ("chat", dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), "messages", "only text parts"),
        ("chat", dict(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), "messages", "messages[0].role is 'tool'"),
    ],
)
def test_invalid_requests_are_bad_request_errors_naming_the_field(api, endpoint, fields, param, words):
    client = api.client()
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "completions":
            client.completions.create(**{"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, **fields})
        else:
            client.chat.completions.create(**{"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4, "temperature": 0, **fields})
    assert info.value.status_code == 400 and info.value.type == "invalid_request_error"
    assert info.value.param == param and words in info.value.message, info.value.body


def test_overflow_unknown_model_and_malformed_bodies(api):
    client = api.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=100_000, temperature=0)
    assert info.value.code == "context_length_exceeded" and "context limit" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 20_000}], temperature=0, stream=True)
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=2)
    assert info.value.code == "model_not_found" and MODEL in info.value.message
    for body in (b"{not json", b'{"model": "tiny-target"}', b"[1, 2]", b'{"prompt": "x", "max_tokens": "many"}'):
        status, _, reply = request("POST", api.base_url + "/v1/completions", body, {"Content-Type": "application/json"})
        error = json.loads(reply)["error"]
        assert status == 400 and error["type"] == "invalid_request_error" and error["message"], (body, reply)
    status, _, reply = request("GET", api.base_url + "/v1/nothing")
    assert status == 404 and json.loads(reply)["error"]["code"] == "not_found"


# --- the wire change: ignore_eos ----------------------------------------------------------------------------
def test_ignore_eos_reaches_the_stop_rules(router):
    body = CompletionRequest(prompt="x", ignore_eos=True, max_tokens=3)
    assert body.generate_request().ignore_eos and not CompletionRequest(prompt="x", ignore_eos=None).generate_request().ignore_eos
    _, params = router.servicer.validate(body.generate_request())
    assert params.ignore_eos
    policy = PolicyRegistry().get("none")
    for ignore, finish, tokens in ((False, router_pb2.FINISH_REASON_EOS, [5, 2]), (True, router_pb2.FINISH_REASON_LENGTH, [5, 2, 7])):
        state = RequestState([1], Params(max_tokens=3, stop=(), drafter="none", policy=policy, ignore_eos=ignore), lambda ids: "", frozenset({2}))
        chunk = state.commit([5, 2, 7, 8])
        assert (chunk.finish_reason, chunk.token_ids) == (finish, tokens)
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], max_tokens=9, max_completion_tokens=4).generate_request().max_tokens == 4


# --- token, TLS, body limit, loading ---------------------------------------------------------------------------
def test_bearer_token(router):
    api = Api(router, ServerSecurity(auth_token="s3cret"))
    try:
        with pytest.raises(openai.AuthenticationError) as info:
            api.client(api_key="wrong").completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert info.value.status_code == 401 and "bearer token is wrong" in info.value.message
        status, headers, _ = api.get("/v1/models")
        assert status == 401 and headers["www-authenticate"] == "Bearer"
        assert api.get("/metrics")[0] == 401
        assert api.get("/health")[0] == 200  # open, like gRPC health checks
        done = api.client(api_key="s3cret").completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
        assert done.usage.completion_tokens == 2
    finally:
        api.stop()


def test_tls_with_the_routers_certificate(router, certificate):
    cert, key = certificate
    api = Api(router, ServerSecurity(str(cert), str(key)))
    try:
        assert api.base_url.startswith("https://")
        client = api.client(http_client=openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(cert))))
        assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0).usage.completion_tokens == 3
        with pytest.raises(openai.APIConnectionError):  # a client that does not trust it
            api.client().models.list()
    finally:
        api.stop()


def test_request_body_limit(router):
    api = Api(router, max_body_bytes=2000)
    try:
        with pytest.raises(openai.APIStatusError) as info:
            api.client().completions.create(model=MODEL, prompt="x" * 5000, max_tokens=2)
        assert info.value.status_code == 413 and info.value.code == "request_too_large"
        host, port = api.frontend.address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)  # no Content-Length: counted while read
        conn.request("POST", "/v1/completions", body=iter([b'{"prompt": "', b"x" * 3000, b'"}']), headers={"Content-Type": "application/json"},
                     encode_chunked=True)
        reply = conn.getresponse()
        assert reply.status == 413 and json.loads(reply.read())["error"]["code"] == "request_too_large"
        conn.close()
        assert api.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0).usage.completion_tokens == 2
    finally:
        api.stop()


def test_loading_router_answers_503():
    api = Api(None)
    try:
        status, _, body = api.get("/health")
        assert status == 503 and json.loads(body)["error"]["code"] == "service_unavailable"
        with pytest.raises(openai.InternalServerError) as info:
            api.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert info.value.status_code == 503 and "still loading" in info.value.message
    finally:
        api.stop()


# --- overload and clients that leave (a verifier whose Verify waits at a gate) -------------------------------
def test_overload_is_a_rate_limit_error_with_retry_after(gated):
    verifier, _, _, router = gated
    api = Api(router)
    try:
        first = router.stub.Generate.future(router_pb2.GenerateRequest(prompt="first", max_tokens=5), timeout=60)
        assert verifier.verifying.wait(10)  # the batch (size 1) is full
        second = router.stub.Generate.future(router_pb2.GenerateRequest(prompt="second", max_tokens=5), timeout=60)
        assert wait_until(lambda: len(router.servicer.scheduler.waiting) == 1)  # and so is the queue
        with pytest.raises(openai.RateLimitError) as info:
            api.client().completions.create(model=MODEL, prompt="third", max_tokens=5)
        assert info.value.status_code == 429 and info.value.response.headers["retry-after"] == "1"
        assert "requests already wait for admission (limit 1)" in info.value.message
        verifier.gate.set()
        assert len(first.result().token_ids) == 5 and len(second.result().token_ids) == 5
    finally:
        api.stop()


def test_clients_that_disconnect_free_their_requests_everywhere(gated):
    verifier, server, drafter, router = gated
    scheduler = router.servicer.scheduler
    api = Api(router)
    try:
        stream = api.client().completions.create(model=MODEL, prompt="cancel me", max_tokens=400, stream=True, temperature=0,
                                                 extra_body={"speculation_policy": "fixed:3"})
        first = next(iter(stream))  # the prefill's token: admitted
        assert first.choices[0].finish_reason is None
        assert verifier.verifying.wait(10) and drafter.contexts  # proposed, then stuck in Verify
        # a non-streamed request waits in the queue behind it; its client gives up
        with pytest.raises(openai.APITimeoutError):
            api.client(timeout=1.0).completions.create(model=MODEL, prompt="never admitted", max_tokens=5)
        assert wait_until(lambda: not scheduler.waiting, 5), "the abandoned request still waits in the queue"
        stream.close()
        verifier.gate.set()
        assert wait_until(lambda: verifier_live(server.address) == 0), "the verifier still holds the cancelled request"
        assert wait_until(lambda: not drafter.contexts and drafter.released), "the drafter still holds the cancelled request"
        assert wait_until(lambda: not scheduler.running)
        assert verifier.verify_calls <= 3  # it left at a step boundary, long before 400 tokens
        assert api.client().completions.create(model=MODEL, prompt="after", max_tokens=3, temperature=0).usage.completion_tokens == 3
    finally:
        api.stop()


# --- shutdown ---------------------------------------------------------------------------------------------------
class SlowDrafter(ScriptedDrafter):
    """Takes 50 ms per proposal, so a long request is still running when the router drains."""

    async def Propose(self, request, context):
        await asyncio.sleep(0.05)
        return await super().Propose(request, context)


def test_drain_ends_open_streams_within_the_grace(tiny_target):
    drafter_server = serve_drafter(SlowDrafter())
    router = RouterThread(tokenizer_for(str(tiny_target)), verifier_for(str(tiny_target)).address, {"slow": drafter_server.address},
                          drafter="slow", policy="fixed:1", cost_profile="off")
    api = Api(router)
    try:
        stream = api.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=400, stream=True, temperature=0)
        events = iter(stream)
        next(events)
        started = time.monotonic()
        draining = asyncio.run_coroutine_threadsafe(router.servicer.drain(0.5), router.loop)
        assert wait_until(lambda: api.get("/health")[0] == 503, 2)
        with pytest.raises(openai.InternalServerError) as info:  # new requests are refused while draining
            api.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert info.value.status_code == 503 and "shutting down" in info.value.message
        with pytest.raises(openai.APIError) as info:  # the open stream ends with an error event once the grace is over
            list(events)
        assert "shutting down" in info.value.message
        draining.result(timeout=15)
        router.call(api.frontend.stop())
        assert time.monotonic() - started < 0.5 + 3.0
    finally:
        api.stop()
        router.stop()
        drafter_server.stop()


def test_uvicorn_leaves_signal_handlers_alone():
    """The router's drain is in charge of SIGTERM and SIGINT (smartspec.serving): starting and stopping
    the API on the main thread's loop changes no handler."""

    async def handlers_while_serving() -> list[dict]:
        seen = [{sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}]
        frontend = HttpFrontend(Backend(MODEL), "127.0.0.1", 0)
        await frontend.start()
        seen.append({sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)})
        await frontend.stop()
        seen.append({sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)})
        return seen

    assert threading.current_thread() is threading.main_thread()
    before, during, after = asyncio.run(handlers_while_serving())
    assert before == during == after


def test_router_process_serves_http_and_drains_it_on_sigterm(tiny_target, tmp_path):
    """SIGTERM stays with the router (uvicorn's own handlers would close the API at once and cut open
    streams after its short timeout): the API reports 503 while a stream longer than that finishes."""
    drafter_server = serve_drafter(SlowDrafter())  # 50 ms a step: 60 tokens take ~3 s
    argv = ["router", "--port", "0", "--http-port", "0", "--verifier", verifier_for(str(tiny_target)).address, "--target-model", str(tiny_target),
            "--drafter-address", f"slow={drafter_server.address}", "--default-drafter", "slow", "--default-policy", "fixed:1",
            "--cost-profile", "off", "--grace-s", "20", "--served-model-name", MODEL]
    try:
        with serve(argv, tmp_path / "router.log") as (process, address):
            _, http_part = address.split(" ")
            assert http_part.startswith("http=127.0.0.1:")
            base = "http://" + http_part.removeprefix("http=")
            assert wait_until(lambda: request("GET", base + "/health")[0] == 200, 60), (tmp_path / "router.log").read_text()[-2000:]
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
            events = iter(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=60, stream=True, temperature=0))
            got = [next(events)]
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert wait_until(lambda: request("GET", base + "/health")[0] == 503, 2)  # still answering, not serving
            got += list(events)  # drained: the stream finishes
            assert time.monotonic() - started > 2.0, "precondition: the stream outlived uvicorn's own shutdown timeout"
            assert got[-1].choices[0].finish_reason == "length" and sum(len(c.choices[0].text) > 0 for c in got) > 10
            assert process.wait(timeout=15) == 0, (tmp_path / "router.log").read_text()[-2000:]
            with pytest.raises(openai.APIConnectionError):
                client.models.list()
    finally:
        drafter_server.stop()
