"""End to end over loopback: the router's tokens equal transformers' greedy generate() of the target,
for every drafter and k, with many requests batched together, and with drafters that are wrong,
forgetful or broken on purpose."""

from __future__ import annotations

import random

import pytest

from smartspec.wire import router_pb2
from tests.support import assert_lossless, reference_greedy
from tests.test_router_stack import (
    FailingDrafter,
    RouterThread,
    ScriptedDrafter,
    generate_many,
    lookup_drafter,
    serve_drafter,
    stack,  # noqa: F401  (fixture)
    tokenizer_for,
    verifier_for,
    verifier_live,
    wait_until,
)

MAX_TOKENS = 24
WORDS = (
    "alpha beta gamma delta river stone cloud paper green quick brown fox jumps over lazy dog seven eleven market "
    "garden window silver music table orange planet engine yellow winter summer bridge forest"
).split()
PROMPTS = {
    "short": "Hi",
    "medium": "The quick brown fox jumps over the lazy dog near the river bank.",
    "long": " ".join(random.Random(7).choice(WORDS) for _ in range(140)),
}


def repeating_prompt(tiny_target, tokenizer) -> str:
    """A prompt that repeats itself and for which prompt lookup must propose: its greedy continuation
    produces, early enough, a token that is already in the context (searched, so that the choice
    survives a change of the tiny model's seed)."""
    for seed in range(60):
        rng = random.Random(seed)
        phrase = " ".join(rng.choice(WORDS) for _ in range(12))
        text = (phrase + ". ") * 4
        ids = tokenizer(text).input_ids
        ref, _ = reference_greedy(tiny_target, ids, MAX_TOKENS)
        context = ids + ref
        if any(context[i] in context[:i] for i in range(len(ids), len(ids) + MAX_TOKENS - 2)):
            return text
    pytest.fail("no candidate prompt makes prompt lookup propose on this tiny model")


@pytest.fixture(scope="module")
def prompts(tiny_target):
    tokenizer = tokenizer_for(str(tiny_target))
    out = dict(PROMPTS, repeat=repeating_prompt(tiny_target, tokenizer))
    refs = {name: reference_greedy(tiny_target, tokenizer(text).input_ids, MAX_TOKENS) for name, text in out.items()}
    return out, refs


def test_lossless_for_every_drafter_and_k_with_requests_batched_together(stack, prompts):
    texts, refs = prompts
    combos = [(name, drafter, k) for name in texts for drafter in ("prompt_lookup", "draft_model", "self_draft") for k in (0, 1, 3, 5)]
    requests = [
        router_pb2.GenerateRequest(prompt=texts[name], max_tokens=MAX_TOKENS, drafter=drafter, policy="none" if k == 0 and drafter == "self_draft" else f"fixed:{k}")
        for name, drafter, k in combos
    ]
    steps_before = stack.servicer.scheduler.steps
    replies = generate_many(stack.stub, requests)
    totals: dict[tuple[str, int], list[int]] = {}
    for (name, drafter, k), reply in zip(combos, replies):
        assert isinstance(reply, router_pb2.GenerateResponse), f"{name}/{drafter}/k={k}: {reply}"
        ref, gaps = refs[name]
        assert_lossless(reply.token_ids, ref, gaps, f"{name}/{drafter}/k={k}")
        stats = reply.stats
        assert stats.proposed <= k * stats.steps and stats.accepted <= stats.proposed
        if k == 0:
            assert stats.proposed == 0 and stats.steps == len(reply.token_ids) - 1
        sums = totals.setdefault((drafter, k), [0, 0, 0])
        sums[0] += stats.proposed
        sums[1] += stats.accepted
        sums[2] += stats.steps
        if drafter == "prompt_lookup" and name == "repeat" and k > 0:
            assert stats.proposed > 0, f"prompt lookup never proposed for the repeating prompt (k={k})"
    for k in (1, 3, 5):
        proposed, accepted, _ = totals[("draft_model", k)]
        assert proposed > 0 and accepted < proposed, "the often-wrong draft model was not exercised"
        proposed, accepted, steps = totals[("self_draft", k)]
        assert accepted > 0 and steps < len(texts) * (MAX_TOKENS - 1), "a perfect draft did not shorten generation"
    # 48 requests of 24 tokens, at most 16 at a time: batched far below one Verify per request-step
    assert stack.servicer.scheduler.steps - steps_before < sum(t[2] for t in totals.values()) / 4


def test_wrong_and_forgetful_drafter_stays_exact(tiny_target, prompts):
    texts, refs = prompts
    tokenizer = tokenizer_for(str(tiny_target))
    full = [tokenizer(texts[name]).input_ids + refs[name][0] for name in texts]
    scripted = ScriptedDrafter(references=full, forget_every=3)
    server = serve_drafter(scripted)
    router = RouterThread(tokenizer, verifier_for(str(tiny_target)).address, {"scripted": server.address}, drafter="scripted")
    try:
        names = [name for name in texts for _ in range(3)]
        policies = ["fixed:1", "fixed:3", "fixed:5"] * len(texts)
        replies = generate_many(router.stub, [router_pb2.GenerateRequest(prompt=texts[n], max_tokens=MAX_TOKENS, policy=p) for n, p in zip(names, policies)])
        for name, policy, reply in zip(names, policies, replies):
            assert isinstance(reply, router_pb2.GenerateResponse), reply
            assert_lossless(reply.token_ids, *refs[name], f"{name}/{policy}")
        proposed = sum(r.stats.proposed for r in replies)
        accepted = sum(r.stats.accepted for r in replies)
        assert 0 < accepted < proposed
        assert scripted.resyncs > 0, "the router was never asked to resync"
        assert scripted.full_sends > len(replies), "no request was resent in full after a resync"
        assert wait_until(lambda: not scripted.contexts), "the drafter's state was not released"
    finally:
        router.stop()
        server.stop()


def test_failing_drafters_cost_only_their_speculation(tiny_target, prompts):
    """Drafters that fail, hang or send invalid tokens: every request ends exact. Invalid tokens are
    checked once, by the verifier, which verifies the valid prefix ("half": one token a step)."""
    texts, refs = prompts
    failing = {mode: FailingDrafter(mode) for mode in ("raise", "hang", "garbage", "half")}
    servers = {mode: serve_drafter(drafter) for mode, drafter in failing.items()}
    verifier = verifier_for(str(tiny_target))
    router = RouterThread(tokenizer_for(str(tiny_target)), verifier.address, {m: s.address for m, s in servers.items()}, drafter_timeout_s=0.3)
    try:
        combos = [(name, mode) for name in ("short", "medium", "repeat") for mode in (*failing, "none")]
        replies = generate_many(router.stub, [router_pb2.GenerateRequest(prompt=texts[n], max_tokens=MAX_TOKENS, drafter=m, policy="fixed:3") for n, m in combos])
        for (name, mode), reply in zip(combos, replies):
            assert isinstance(reply, router_pb2.GenerateResponse), f"{name}/{mode}: request lost: {reply}"
            assert_lossless(reply.token_ids, *refs[name], f"{name}/{mode}")
            if mode == "half":
                assert 0 < reply.stats.proposed <= reply.stats.steps, f"{name}: {reply.stats}"
            else:
                assert reply.stats.proposed == 0
        assert all(drafter.calls >= 1 for drafter in failing.values())
        assert all(router.servicer.scheduler.drafters[m].failures >= 1 for m in ("raise", "hang"))
        assert wait_until(lambda: verifier_live(verifier.address) == 0)
    finally:
        router.stop()
        for server in servers.values():
            server.stop()


@pytest.mark.slow
def test_embedded_smollm2_chat_with_prompt_lookup_is_exact_and_ends_at_eos(embedded):
    """The real model: a copy-style chat prompt where prompt lookup shines, ending at <|im_end|>."""
    target = str(embedded.target)
    tokenizer = tokenizer_for(target)
    verifier = verifier_for(target, max_sequences=4)
    router = RouterThread(tokenizer, verifier.address, {"prompt_lookup": lookup_drafter().address})
    try:
        chat = [{"role": "user", "content": "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog."}]
        ids = tokenizer(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False), add_special_tokens=False).input_ids
        ref, gaps = reference_greedy(embedded.target, ids, 40)
        reply = router.stub.Generate(
            router_pb2.GenerateRequest(
                messages=[router_pb2.ChatMessage(**chat[0])], max_tokens=40, drafter="prompt_lookup", policy="fixed:5"
            ),
            timeout=300,
        )
        assert_lossless(reply.token_ids, ref, gaps, "smollm2")
        assert reply.stats.accepted > 0 and reply.stats.steps < len(reply.token_ids) - 1
        if len(ref) < 40:  # the reference ended at an end-of-sequence token
            assert reply.finish_reason == router_pb2.FINISH_REASON_EOS and reply.token_ids[-1] == tokenizer.eos_token_id
            assert "fox jumps over the lazy dog" in reply.text and "<|im_end|>" not in reply.text
    finally:
        router.stop()

