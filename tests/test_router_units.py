"""Unit tests of the router's pure pieces: policies, incremental detokenization, stop sequences, a
request's finish rules, validation, drafter sync and the admission queue. No servers here."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Sequence

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.controller.cost_model import VERIFY_FEATURES
from router.detokenize import IncrementalDetokenizer, tokenizer_decoder
from router.drafters import Draft, DrafterClient, DrafterReplicas
from router.prefill_budget import MIN_PREFILL_TOKENS, PREFILL_STRETCH, PrefillPacer, plan_chunks
from router.policy import FixedSpeculation, NoSpeculation, PolicyRegistry, RequestView, SpeculationPolicy, clamp_k, parse_policy
from router.request import Params, RequestState
from router.scheduler import Limits, Scheduler
from router.stops import StopMatcher
from router.validate import Defaults, PromptEncoder, RequestValidator
from smartspec.errors import RequestError
from smartspec.wire import common_pb2, drafter_pb2, router_pb2, verifier_pb2

MULTIBYTE = ["héllo 😀 世界 🎉🎉 done", "日本語のテキストです。", "a👨‍👩‍👧b ñ ü 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "🙂", "plain ascii only"]


@pytest.fixture(scope="module")
def tokenizer(embedded):
    from router.main import load_tokenizer

    return load_tokenizer(str(embedded.target))


# --- policies ----------------------------------------------------------------------------------------
def _view(i: int = 0, max_k: int = 10, drafter: str = "prompt_lookup") -> RequestView:
    return RequestView(request_id=f"r{i}", drafter=drafter, context_tokens=10 + i, generated=i, max_k=max_k)


def test_parse_policy_accepts_none_and_fixed():
    assert parse_policy("none") == NoSpeculation()
    assert parse_policy("fixed:0") == FixedSpeculation(0)
    assert parse_policy("fixed:5") == FixedSpeculation(5)
    assert parse_policy("fixed:5").name == "fixed:5" and parse_policy("none").name == "none"


@pytest.mark.parametrize("spec", ["", "fixed", "fixed:", "fixed:-1", "fixed:x", "fixed:1.5", "fixed:99", "goodput?", "FIXED:3"])
def test_parse_policy_rejects_with_a_usable_message(spec):
    with pytest.raises(RequestError) as info:
        parse_policy(spec)
    assert info.value.status == "INVALID_ARGUMENT"
    assert "fixed:K" in info.value.message and repr(spec) in info.value.message


def test_fixed_policy_is_per_request_and_respects_each_limit():
    views = [_view(0, max_k=10), _view(1, max_k=2), _view(2, max_k=0)]
    assert FixedSpeculation(3).choose(views) == [3, 2, 0]
    assert NoSpeculation().choose(views) == [0, 0, 0]
    assert FixedSpeculation(3).choose([]) == []


def test_clamp_k_bounds_any_policy_answer():
    assert clamp_k(7, 4) == 4
    assert clamp_k(-3, 4) == 0
    assert clamp_k(2, 4) == 2


def test_registry_shares_one_instance_per_spec_and_names_extra_policies():
    extra = _IndexPolicy([0])
    registry = PolicyRegistry({"goodput": extra})
    assert registry.get("fixed:2") is registry.get(" fixed:2 ") and registry.get("goodput") is extra
    with pytest.raises(RequestError) as info:
        registry.get("uniform")
    assert "'none', 'fixed:K' or goodput" in info.value.message


class _IndexPolicy(SpeculationPolicy):
    """Gives request r-N the answer answers[N], verifies one token less than came back, and records
    every call (to see the scheduler obey, clamp and report)."""

    def __init__(self, answers):
        self.answers = answers
        self.chosen, self.refined, self.observed, self.forgotten = [], [], [], []

    @property
    def name(self):
        return "index"

    def choose(self, batch):
        self.chosen.append([v.request_id for v in batch])
        return [self.answers[int(v.request_id.split("-")[1])] for v in batch]

    def refine(self, batch, asked, lengths):
        self.refined.append((list(asked), list(lengths)))
        return [n - 1 for n in lengths]

    def observe(self, outcome):
        self.observed.append(outcome)

    def forget(self, request_id):
        self.forgotten.append(request_id)


def _state(prompt, params, eos=(2,), rid=None, decode=None) -> RequestState:
    state = RequestState(prompt_ids=list(prompt), params=params, decode=decode or (lambda ids: "".join(chr(65 + t % 26) for t in ids)), eos_ids=frozenset(eos))
    if rid:
        state.id = rid
    return state


class _FakeVerifier:
    """Accepts every draft; emits the drafts and then token 60; a context's first token is 50. Records
    every Verify's draft counts (one with requests to verify) and prefill chunks (one with chunks)."""

    def __init__(self):
        self.verified, self.chunks, self.released = [], [], []
        self.unfilled: dict[str, int] = {}

    async def Prefill(self, request, timeout=None, metadata=None):
        if request.chunked:
            self.unfilled.update((item.request_id, len(item.token_ids)) for item in request.items)
            return verifier_pb2.PrefillResponse()
        return verifier_pb2.PrefillResponse(next_token_ids=[50] * len(request.items))

    async def Verify(self, request, timeout=None, metadata=None):
        if request.request_ids:
            self.verified.append(list(request.draft_counts))
        if request.prefill_request_ids:
            self.chunks.append(list(zip(request.prefill_request_ids, request.prefill_counts)))
        drafts, emitted, start = list(request.draft_token_ids), [], 0
        for n in request.draft_counts:
            emitted += drafts[start : start + n] + [60]
            start += n
        firsts = []
        for rid, count in zip(request.prefill_request_ids, request.prefill_counts):
            assert 1 <= count <= self.unfilled[rid], "a chunk past its context"
            self.unfilled[rid] -= count
            if not self.unfilled[rid]:
                firsts.append(50)
        return verifier_pb2.VerifyResponse(
            accepted_counts=list(request.draft_counts), emitted_token_ids=emitted, stats=common_pb2.StepStats(num_context_tokens=99),
            prefill_next_token_ids=firsts, verified_draft_counts=list(request.draft_counts),
        )

    async def Release(self, request, timeout=None):
        self.released += list(request.request_ids)
        return verifier_pb2.ReleaseResponse()


class _FakeDrafter:
    """Returns min(k, 4) copies of token 70."""

    def __init__(self):
        self.asked = []

    def available(self):
        return True

    async def propose(self, requests, ks):
        self.asked.append(list(ks))
        return [Draft([70] * min(k, 4)) for k in ks], 0.001

    async def release(self, ids):
        pass


def test_scheduler_runs_each_policy_phase_on_its_own_requests_and_clamps():
    custom = _IndexPolicy([9, 1, 4, 2])
    limits = Limits(max_context=40, vocab_size=100, eos_ids=frozenset({2}), max_sequences=8)
    verifier, drafter = _FakeVerifier(), _FakeDrafter()
    scheduler = Scheduler(verifier=verifier, drafters={"pl": drafter}, limits=limits, max_step_tokens=64)
    mk = lambda i, policy, max_tokens=20, prompt=5, drafter="pl": _state(
        [1] * prompt, Params(max_tokens=max_tokens, stop=(), drafter=drafter, policy=policy), rid=f"r-{i}"
    )
    requests = [
        mk(0, custom),  # asks 9 (room 18), 4 come back, refine verifies 3
        mk(1, FixedSpeculation(3)),  # asks 3, verifies all 3
        mk(2, custom, max_tokens=3),  # asks 4, clamped to its budget: 3 - 1 - 1 = 1
        mk(3, custom, prompt=38),  # asks 2, clamped to the context: 40 - 39 = 1
        mk(4, FixedSpeculation(3), drafter="none"),  # no drafter: 0
    ]
    for request in requests:
        scheduler.submit(request)
    asyncio.run(scheduler.iterate())  # admission + a step that prefills every prompt (58 tokens, within the budget): 1 token each
    assert verifier.chunks == [[("r-0", 5), ("r-1", 5), ("r-2", 5), ("r-3", 38), ("r-4", 5)]] and verifier.verified == []
    asyncio.run(scheduler.iterate())  # the first decoding step
    assert drafter.asked == [[9, 3, 1, 1]]
    assert custom.chosen == [["r-0", "r-2", "r-3"]]  # one call, only its own requests
    assert custom.refined == [([9, 1, 1], [4, 1, 1])]
    assert verifier.verified == [[3, 3, 0, 0, 0]]
    (outcome,) = custom.observed
    assert [(o.request_id, o.asked, o.proposed, o.accepted) for o in outcome.requests] == [("r-0", 9, 3, 3), ("r-2", 1, 0, 0), ("r-3", 1, 0, 0)]
    assert (outcome.num_sequences, outcome.new_tokens, outcome.context_tokens) == (5, 11, 99)
    assert outcome.drafts["pl"][0] == (9, 3, 1, 1) and outcome.step_s >= outcome.verify_s > 0
    assert requests[0].tokens == [1] * 5 + [50, 70, 70, 70, 60] and requests[0].counters.proposed == 3
    while scheduler.running:
        asyncio.run(scheduler.iterate())
    assert sorted(custom.forgotten) == ["r-0", "r-2", "r-3"] and sorted(verifier.released) == [f"r-{i}" for i in range(5)]
    assert all(len(r.tokens) - len(r.prompt_ids) == r.params.max_tokens for r in requests)


@pytest.fixture
def fixed_budget(monkeypatch):
    """The step's room as a fixed budget (max_step_tokens less the decoding requests, at least
    MIN_PREFILL_TOKENS): these tests are about how the loop lays chunks out, not about pacing, which
    follows the controller's cost model."""
    monkeypatch.setattr(PrefillPacer, "room", lambda self, decoding, prefill_left, price: max(self.max_step_tokens - decoding, MIN_PREFILL_TOKENS))


def test_the_loop_paces_prefill_by_its_controllers_cost_model():
    """The replica loop sizes a prompt's chunks from its controller's verify cost model at k = 0: here
    a model in which a prefill token costs as much as a decode step of the 3 running requests, so at
    the stretch of 2.25 a step has room for one token, and the chunk is the minimum."""
    verifier = _FakeVerifier()
    limits = Limits(max_context=400, vocab_size=100, eos_ids=frozenset(), max_sequences=8)
    scheduler = Scheduler(verifier=verifier, drafters={}, limits=limits, max_batch=4)
    loop = scheduler.loops[0]
    prior = dict(zip(VERIFY_FEATURES, [0.0] * len(VERIFY_FEATURES)), const=0.03, new_tokens=0.03)
    loop.controller.verify_cost.reset_prior([prior[name] for name in VERIFY_FEATURES])
    for i in range(3):
        scheduler.submit(_state([1] * 5, Params(max_tokens=60, stop=(), drafter="none", policy=NoSpeculation()), rid=f"r{i}"))
    asyncio.run(scheduler.iterate())
    scheduler.submit(_state([1] * 300, Params(max_tokens=4, stop=(), drafter="none", policy=NoSpeculation()), rid="long"))
    for _ in range(2):
        asyncio.run(scheduler.iterate())
    assert verifier.chunks[-1] == [("long", MIN_PREFILL_TOKENS)]
    prior.update(new_tokens=0.0001)  # prefill nearly free: the step cap holds (512 less the decoding requests)
    loop.controller.verify_cost.reset_prior([prior[name] for name in VERIFY_FEATURES])
    asyncio.run(scheduler.iterate())
    assert verifier.chunks[-1] == [("long", 300 - 2 * MIN_PREFILL_TOKENS)]


def test_prefill_goes_in_chunks_within_the_step_budget_first_come_first_served(fixed_budget):
    """A step's budget gives one token to each decoding request, the rest to prefill chunks in
    admission order; the decoding requests' drafts come on top."""
    verifier, drafter = _FakeVerifier(), _FakeDrafter()
    limits = Limits(max_context=200, vocab_size=100, eos_ids=frozenset(), max_sequences=8)
    scheduler = Scheduler(verifier=verifier, drafters={"pl": drafter}, limits=limits, max_batch=4, max_step_tokens=20)
    mk = lambda rid, prompt, max_tokens=8: _state([1] * prompt, Params(max_tokens=max_tokens, stop=(), drafter="pl", policy=FixedSpeculation(4)), rid=rid)
    first, long, short = mk("a", 3, max_tokens=20), mk("b", 45), mk("c", 10)
    scheduler.submit(first)
    asyncio.run(scheduler.iterate())  # a's prompt whole, and its first token
    assert first.tokens == [1] * 3 + [50] and verifier.verified == []
    scheduler.submit(long)
    scheduler.submit(short)
    for _ in range(4):
        asyncio.run(scheduler.iterate())
    assert verifier.chunks == [[("a", 3)], [("b", 19)], [("b", 19)], [("b", 7), ("c", 10)]]  # 20 - 1 for a's token
    assert verifier.verified == [[4], [4], [4], [3, 4, 4]]  # a's last: the room its 20 tokens leave
    assert long.tokens == [1] * 45 + [50, 70, 70, 70, 70, 60] and short.first_token is not None
    while scheduler.running:
        asyncio.run(scheduler.iterate())
    assert sorted(verifier.released) == ["a", "b", "c"]


def test_with_nothing_decoding_the_first_prompt_in_line_goes_whole(fixed_budget):
    """No stream to hold back: the first prompt is prefilled in one forward, the budget's rest goes to
    the next in line; once a request decodes, chunks again."""
    verifier = _FakeVerifier()
    limits = Limits(max_context=200, vocab_size=100, eos_ids=frozenset(), max_sequences=8)
    scheduler = Scheduler(verifier=verifier, drafters={}, limits=limits, max_batch=4, max_step_tokens=20)
    mk = lambda rid, prompt: _state([1] * prompt, Params(max_tokens=4, stop=(), drafter="none", policy=NoSpeculation()), rid=rid)
    for request in (mk("long", 45), mk("short", 10), mk("later", 30)):
        scheduler.submit(request)
    asyncio.run(scheduler.iterate())
    asyncio.run(scheduler.iterate())
    assert verifier.chunks == [[("long", 45)], [("short", 10), ("later", 9)]]  # then 20 - 1 decoding - 10


def test_a_prefill_advances_however_many_requests_decode(fixed_budget):
    """A budget the decoding requests alone fill still leaves a prefill MIN_PREFILL_TOKENS a step."""
    verifier = _FakeVerifier()
    limits = Limits(max_context=200, vocab_size=100, eos_ids=frozenset(), max_sequences=8)
    scheduler = Scheduler(verifier=verifier, drafters={}, limits=limits, max_batch=8, max_step_tokens=4)
    mk = lambda rid, prompt: _state([1] * prompt, Params(max_tokens=30, stop=(), drafter="none", policy=NoSpeculation()), rid=rid)
    for i in range(4):
        scheduler.submit(mk(f"d{i}", 1))
    asyncio.run(scheduler.iterate())  # the first prompt whole (nothing decodes), the budget's rest to the others
    scheduler.submit(mk("long", 40))
    for _ in range(3):
        asyncio.run(scheduler.iterate())
    assert verifier.chunks[-3:] == [[("long", 16)], [("long", 16)], [("long", 8)]]
    with pytest.raises(ValueError, match="at least 1"):
        Scheduler(verifier=_FakeVerifier(), drafters={}, limits=limits, max_step_tokens=0)


def _cpu_like_pricer(decoding: int, cached: Sequence[int]):
    """Prices as on one core of the reference CPU: a decode step of `decoding` requests 150 ms, a prefill
    token 4 ms at the start of a prompt and more as the context it attends to grows."""
    def price(sizes: Sequence[int]) -> float:
        return 0.150 * decoding / 8 + sum(n * (0.004 + 0.002 * (c + n / 2) / 1500) for c, n in zip(cached, sizes))
    return price


def test_the_pacer_sizes_prefill_so_a_step_takes_the_stretch_of_a_decode_step():
    """A 1,500-token prompt beside 8 decoding requests goes in chunks whose steps are priced at 2.25x a
    decode step (within a token), smaller chunks as each token attends to more context."""
    pacer = PrefillPacer(max_step_tokens=512)
    done, chunks = 0, []
    while done < 1500:
        price = _cpu_like_pricer(8, [done])
        chunk = pacer.plan(8, [1500 - done], price)[0]
        if done + chunk < 1500:  # the last chunk is what was left
            assert price([chunk]) <= PREFILL_STRETCH * price([0]) < price([chunk + 1])
        chunks.append(chunk)
        done += chunk
    assert chunks[-2] < chunks[0]
    assert pacer.plan(16, [1500], _cpu_like_pricer(16, [0]))[0] > chunks[0]  # a dearer decode step leaves more room


def test_prompts_that_outnumber_the_streams_widen_the_pace():
    """8 prompts waiting beside 2 streams: a pace set by 2 streams' step would feed them 16 tokens a step
    and keep the batch small; the stretch grows with the prompts per stream (1 + 1.25 x 8/2 = 6), and
    while prompts do not outnumber streams it stays the base one."""
    pacer = PrefillPacer(max_step_tokens=512)
    assert pacer.stretch_for(2, 8) == pytest.approx(6.0)
    assert pacer.stretch_for(8, 1) == pacer.stretch_for(8, 8) == PREFILL_STRETCH
    left, price = [300] * 8, _cpu_like_pricer(2, [0] * 8)
    chunks = pacer.plan(2, left, price)
    assert price(chunks) <= 6.0 * price([0] * 8) < price(plan_chunks(sum(chunks) + 1, 2, left))  # the most that fits
    assert sum(chunks) > 2 * pacer.plan(2, [300], _cpu_like_pricer(2, [0]))[0]


def test_the_pacer_keeps_within_the_step_cap_and_the_minimum():
    pacer = PrefillPacer(max_step_tokens=64)
    free = lambda sizes: 0.010  # prefill looks free: the cap holds (one token per decoding request)
    assert pacer.plan(4, [500], free) == [60]
    assert pacer.plan(4, [30, 500], free) == [30, 30]  # first come, first served
    dear = lambda sizes: 0.010 + 5.0 * sum(sizes)  # prefill looks dear: a prefill still advances
    assert pacer.plan(4, [500], dear) == [MIN_PREFILL_TOKENS]
    assert pacer.plan(0, [500, 30], dear) == [500, 0]  # nothing decodes: the first prompt whole
    with pytest.raises(ValueError, match="above 1"):
        PrefillPacer(stretch=1.0)
    with pytest.raises(ValueError, match="at least 1"):
        PrefillPacer(max_step_tokens=0)


# --- incremental detokenization ------------------------------------------------------------------------
@pytest.fixture(params=["stream", "window"], scope="module")
def make(request):
    """Each detokenizer: the tokenizer library's DecodeStream, and the two-decode window (any decode)."""
    return (lambda decode: decode.detokenizer()) if request.param == "stream" else IncrementalDetokenizer


@pytest.mark.parametrize("text", MULTIBYTE)
def test_detokenizer_never_streams_partial_characters(tokenizer, make, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    decode = tokenizer_decoder(tokenizer)
    assert any("\ufffd" in decode([i]) for i in ids) or text.isascii()  # the case is really exercised
    detok = make(decode)
    chunks = [detok.add([i]) for i in ids]
    assert not any("\ufffd" in chunk for chunk in chunks)
    assert "".join(chunks) + detok.flush() == decode(ids) == text


@pytest.mark.parametrize("seed", range(5))
def test_detokenizer_with_ragged_groups_of_tokens(tokenizer, make, seed):
    rng = random.Random(seed)
    text = " ".join(MULTIBYTE)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = make(tokenizer_decoder(tokenizer))
    chunks, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 4)
        chunks.append(detok.add(ids[i : i + n]))
        i += n
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) + detok.flush() == text


def test_detokenizer_holds_an_incomplete_character_until_the_end(tokenizer, make):
    ids = tokenizer("世", add_special_tokens=False).input_ids
    assert len(ids) > 1
    decode = tokenizer_decoder(tokenizer)
    detok = make(decode)
    assert detok.add(ids[:-1]) == ""
    assert detok.flush() == decode(ids[:-1])  # what the tokenizer itself shows for a cut character
    assert detok.flush() == ""


def test_detokenizer_skips_special_tokens(tokenizer, make):
    detok = make(tokenizer_decoder(tokenizer))
    ids = tokenizer("Hi there", add_special_tokens=False).input_ids
    assert "".join(detok.add([i]) for i in [*ids, tokenizer.eos_token_id]) + detok.flush() == "Hi there"


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=40))
def test_detokenizer_streams_exactly_the_decoded_text(tokenizer, make, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    decode = tokenizer_decoder(tokenizer)
    detok = make(decode)
    chunks = [detok.add([i]) for i in ids]
    assert "".join(chunks) + detok.flush() == decode(ids)
    if "\ufffd" not in decode(ids):  # the tokenizer cannot spell some unassigned code points
        assert not any("\ufffd" in c for c in chunks)


def test_a_streamed_request_spells_exactly_its_decoded_text_up_to_its_stop(tokenizer):
    """Through a request's own commit: the streamed pieces concatenate to decode(all committed ids),
    cut before the stop string, with multi-byte characters split over tokens and steps."""
    decode = tokenizer_decoder(tokenizer)
    text = "héllo 😀 世界 🎉🎉 END and more 🙂"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    for stop, expected in (((), text), (("END",), "héllo 😀 世界 🎉🎉 "), (("🎉🎉",), "héllo 😀 世界 ")):
        request = RequestState(prompt_ids=[1], params=Params(max_tokens=len(ids), stop=stop, drafter="none", policy=NoSpeculation()),
                               decode=decode, eos_ids=frozenset())
        pieces, i = [], 0
        while not request.done:
            chunk = request.commit(ids[i : i + 3])
            pieces.append(chunk.text)
            i += 3
        assert "".join(pieces) == expected
        assert not any("\ufffd" in piece for piece in pieces)
        if not stop:
            assert "".join(pieces) == decode(request.tokens[1:])


# --- stop sequences ----------------------------------------------------------------------------------
def test_stop_split_over_chunks_is_never_streamed():
    stops = StopMatcher(["\n\n"])
    assert stops.feed("abc\n") == ("abc", False)
    assert stops.feed("\nxyz") == ("", True)


def test_text_that_only_looked_like_a_stop_is_released():
    stops = StopMatcher(["STOP"])
    assert stops.feed("ab ST") == ("ab ", False)
    assert stops.feed("O") == ("", False)
    assert stops.feed("x") == ("STOx", False)
    assert stops.flush() == ""
    stops.feed("tail S")
    assert stops.flush() == "S"


def test_earliest_stop_wins_and_the_rest_is_dropped():
    stops = StopMatcher(["world", "lo w"])
    assert stops.feed("hello world and more") == ("hel", True)


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet="ab\n.", max_size=30),
    st.lists(st.text(alphabet="ab\n.", min_size=1, max_size=3), min_size=1, max_size=3),
    st.lists(st.integers(1, 5), max_size=30),
)
def test_stop_matcher_equals_cutting_the_text_where_it_first_contains_a_stop(text, stops, cuts):
    """Reference: after each chunk, look at the whole text so far; the first time it contains a stop,
    cut it before the earliest occurrence."""
    matcher = StopMatcher(stops)
    out, i, stopped, expected = [], 0, False, None
    sizes = iter(cuts)
    while i < len(text) and not stopped:
        n = next(sizes, 1)
        released, stopped = matcher.feed(text[i : i + n])
        out.append(released)
        i += n
        hits = [text[:i].find(s) for s in stops if s in text[:i]]
        if hits and expected is None:
            expected = text[: min(hits)]
    if not stopped:
        out.append(matcher.flush())
    assert stopped == (expected is not None)
    assert "".join(out) == (text if expected is None else expected)


# --- a request's finish rules ----------------------------------------------------------------------------
def _params(max_tokens=10, stop=(), policy=None):
    return Params(max_tokens=max_tokens, stop=tuple(stop), drafter="none", policy=policy or NoSpeculation())


def test_max_tokens_drops_the_extra_accepted_tokens():
    state = _state([1, 1], _params(max_tokens=3))
    first = state.commit([10])
    assert first.token_ids == [10] and not first.finish_reason
    last = state.commit([11, 12, 13, 14])
    assert last.token_ids == [11, 12] and last.finish_reason == router_pb2.FINISH_REASON_LENGTH
    assert state.tokens == [1, 1, 10, 11, 12] and last.stats.prompt_tokens == 2


def test_eos_is_kept_and_ends_generation():
    state = _state([1], _params(), eos=(2,))
    chunk = state.commit([3, 2, 4, 5])
    assert chunk.token_ids == [3, 2] and chunk.finish_reason == router_pb2.FINISH_REASON_EOS
    assert chunk.text == "DC"  # the fake decode gives the eos a character; a real tokenizer skips it


def test_stop_string_ends_generation_and_its_text_is_cut():
    vocab = {5: "he", 6: "llo", 7: " wor", 8: "ld", 9: "!", 10: "?"}
    decode = lambda ids: "".join(vocab[i] for i in ids)
    state = _state([1], _params(stop=["o w"]), decode=decode)
    chunk = state.commit([5, 6])
    assert chunk.text == "hell" and not chunk.finish_reason  # "o" could start "o w": held back
    chunk = state.commit([7, 8, 9])
    assert chunk.token_ids == [7] and chunk.text == "" and chunk.finish_reason == router_pb2.FINISH_REASON_STOP


def test_draft_room_respects_max_tokens_and_context():
    state = _state([1] * 10, _params(max_tokens=5))
    assert state.draft_room(max_context=100) == 4  # 5 - 0 - 1
    state.commit([3, 3])
    assert state.draft_room(max_context=100) == 2
    assert state.draft_room(max_context=13) == 1  # 12 committed: KV holds 11 + 1 + k <= 13


# --- validation ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def validate(tokenizer):
    return RequestValidator(PromptEncoder(tokenizer), Defaults(drafter="prompt_lookup", policy="fixed:3"), ["prompt_lookup", "draft_model"], max_context=64)


def _err(validate, **fields):
    with pytest.raises(RequestError) as info:
        validate(router_pb2.GenerateRequest(**fields))
    return info.value.status, info.value.message


def test_validation_messages(validate):
    assert _err(validate, prompt="x", max_tokens=0) == ("INVALID_ARGUMENT", "max_tokens must be at least 1 (got 0)")
    assert _err(validate, prompt="x", max_tokens=-5)[1].startswith("max_tokens must be at least 1")
    assert _err(validate)[0] == "INVALID_ARGUMENT" and "prompt is empty" in _err(validate)[1]
    both = _err(validate, prompt="x", messages=[router_pb2.ChatMessage(role="user", content="y")])
    assert both == ("INVALID_ARGUMENT", "give either prompt or messages, not both")
    status, message = _err(validate, prompt="x", drafter="magic")
    assert status == "INVALID_ARGUMENT" and "'magic'" in message and "prompt_lookup" in message
    status, message = _err(validate, prompt="x", policy="sometimes")
    assert status == "INVALID_ARGUMENT" and "unknown policy 'sometimes'" in message
    assert _err(validate, prompt="x", stop=[""]) == ("INVALID_ARGUMENT", "stop sequences must not be empty strings")
    status, message = _err(validate, messages=[router_pb2.ChatMessage(role="robot", content="y")])
    assert status == "INVALID_ARGUMENT" and "messages[0].role" in message
    status, message = _err(validate, prompt="word " * 30, max_tokens=60)
    assert status == "OUT_OF_RANGE" and "context limit of 64" in message and "max_tokens (60)" in message
    status, message = _err(validate, prompt="word " * 80)
    assert status == "OUT_OF_RANGE" and "shorten the prompt" in message


def test_validation_defaults_and_encodings(validate, tokenizer):
    ids, params = validate(router_pb2.GenerateRequest(prompt="Hello there"))
    assert ids == tokenizer("Hello there").input_ids
    assert params.drafter == "prompt_lookup" and params.policy == FixedSpeculation(3)
    assert params.max_tokens == 64 - len(ids)  # the default 128 is cut to what fits the context
    ids, params = validate(router_pb2.GenerateRequest(prompt="Hi", max_tokens=5, drafter="none", policy="none", stop=["\n"]))
    assert params.max_tokens == 5 and params.drafter == "none" and params.policy == NoSpeculation() and params.stop == ("\n",)
    chat = [{"role": "user", "content": "Say hi"}]
    ids, _ = validate(router_pb2.GenerateRequest(messages=[router_pb2.ChatMessage(**chat[0])], max_tokens=4))
    expected = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert ids == tokenizer(expected, add_special_tokens=False).input_ids


def test_unconfigured_known_drafter_is_explained(tokenizer):
    validate = RequestValidator(PromptEncoder(tokenizer), Defaults(drafter="none"), [], max_context=64)
    status, message = _err(validate, prompt="x", drafter="draft_model")
    assert status == "INVALID_ARGUMENT" and "not running behind this router" in message


# --- drafter sync --------------------------------------------------------------------------------------------
class _FakeDrafterStub:
    """Records ProposeRequests; answers from a script of callables (request -> response or exception)."""

    def __init__(self, *script):
        self.script = list(script)
        self.sent = []

    async def Propose(self, request, timeout=None, metadata=None):
        self.sent.append(request)
        answer = self.script.pop(0)(request)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def Release(self, request, timeout=None):
        return drafter_pb2.ReleaseResponse()


def _reply(*per_request):
    """per_request: (status, draft list)."""
    return lambda request: drafter_pb2.ProposeResponse(
        statuses=[s for s, _ in per_request], draft_counts=[len(d) for _, d in per_request], draft_token_ids=[t for _, d in per_request for t in d]
    )


class _RpcFailure(grpc.RpcError):
    def __init__(self, code=grpc.StatusCode.UNAVAILABLE, details="down"):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


OK, RESYNC = drafter_pb2.PROPOSE_STATUS_OK, drafter_pb2.PROPOSE_STATUS_RESYNC_REQUIRED


def _tokens(call) -> list[list[int]]:
    """Runs a DrafterClient.propose call and returns each request's proposed tokens."""
    drafts, _ = asyncio.run(call)
    return [draft.tokens for draft in drafts]


def test_drafter_sync_sends_only_new_tokens_and_resyncs_in_the_same_step():
    stub = _FakeDrafterStub(
        _reply((OK, [7, 8, 9, 9])),  # more than asked: cut to k
        _reply((OK, [5, 6]), (RESYNC, [])),
        _reply((OK, [4])),
    )
    client = DrafterClient("d", stub, timeout_s=1.0)
    a, b = _state([1, 2, 3], _params(), rid="a"), _state([4, 5], _params(), rid="b")
    assert _tokens(client.propose([a], [3])) == [[7, 8, 9]]
    assert (list(stub.sent[0].appended_counts), list(stub.sent[0].committed_lengths)) == ([3], [3])
    a.commit([7, 8])
    b.drafter_synced[client.name] = 2  # pretend b was synced before and the drafter lost it
    b.commit([1])
    assert _tokens(client.propose([a, b], [2, 2])) == [[5, 6], [4]]
    second, third = stub.sent[1], stub.sent[2]
    assert list(second.appended_counts) == [2, 1] and list(second.appended_token_ids) == [7, 8, 1]
    assert list(second.committed_lengths) == [5, 3]
    assert list(third.request_ids) == ["b"] and list(third.appended_counts) == [3] == list(third.committed_lengths)
    assert a.drafter_synced[client.name] == 5 and b.drafter_synced[client.name] == 3


def test_drafter_failure_costs_only_speculation_and_forces_a_full_resend():
    stub = _FakeDrafterStub(_reply((OK, [1])), lambda r: _RpcFailure(), _reply((OK, [2])))
    client = DrafterClient("d", stub, timeout_s=1.0, backoff_s=0.05)
    a = _state([1, 2, 3], _params(), rid="a")
    asyncio.run(client.propose([a], [1]))
    a.commit([9])
    assert _tokens(client.propose([a], [1])) == [[]]
    assert not client.available() and client.failures == 1 and a.drafter_synced[client.name] == 0
    time.sleep(0.06)
    assert client.available()
    assert _tokens(client.propose([a], [1])) == [[2]]
    assert list(stub.sent[2].appended_counts) == [4] == list(stub.sent[2].committed_lengths)


def _echo(request):
    """A drafter's answer proposing each request's committed length (any k)."""
    return drafter_pb2.ProposeResponse(statuses=[OK] * len(request.request_ids), draft_counts=[1] * len(request.request_ids),
                                       draft_token_ids=list(request.committed_lengths))


def test_drafter_replicas_keep_a_request_on_its_replica_and_move_it_with_a_full_resync():
    stubs = {address: _FakeDrafterStub(*[_echo] * 10) for address in ("a:1", "b:1")}
    group = DrafterReplicas("d", timeout_s=1.0)
    group.clients = {address: DrafterClient("d", stub, timeout_s=1.0) for address, stub in stubs.items()}
    first, second, third = (_state([1, 2, 3], _params(), rid=rid) for rid in ("r1", "r2", "r3"))
    assert _tokens(group.propose([first, second], [1, 1])) == [[3], [3]]
    assert group.home == {"r1": "a:1", "r2": "b:1"}  # the least loaded replica, then it sticks
    first.commit([5])
    group.leave("a:1")  # vanished from DNS: keeps r1, takes nothing new
    assert _tokens(group.propose([first, third], [1, 1])) == [[4], [3]]
    assert group.home == {"r1": "a:1", "r2": "b:1", "r3": "b:1"}
    assert list(stubs["a:1"].sent[-1].appended_counts) == [1]  # only the new token: its state lives there
    group.drop("a:1")  # past its grace period
    first.commit([6])
    assert _tokens(group.propose([first], [1])) == [[5]]
    moved = stubs["b:1"].sent[-1]
    assert list(moved.appended_counts) == [5] == list(moved.committed_lengths)  # the whole context: a resync
    assert group.home["r1"] == "b:1" and group.moved == 1
    asyncio.run(group.release(["r1", "r2", "r3"]))
    assert not group.home


def test_drafter_replicas_without_a_replica_propose_nothing():
    group = DrafterReplicas("d", timeout_s=1.0)
    assert not group.available()
    assert _tokens(group.propose([_state([1], _params())], [2])) == [[]]


# --- admission queue ---------------------------------------------------------------------------------------
def test_queue_full_is_resource_exhausted_at_once_and_cancel_frees_a_place():
    limits = Limits(max_context=64, vocab_size=100, eos_ids=frozenset(), max_sequences=4)
    scheduler = Scheduler(verifier=None, drafters={}, limits=limits, max_batch=8, max_queue=2)
    assert scheduler.max_batch == 4  # never more than the verifier holds
    first, second, third = (_state([1], _params()) for _ in range(3))
    scheduler.submit(first)
    scheduler.submit(second)
    with pytest.raises(RequestError) as info:
        scheduler.submit(third)
    assert info.value.status == "RESOURCE_EXHAUSTED" and "2 requests already wait" in info.value.message
    scheduler.cancel(first)
    scheduler.submit(third)
    assert list(scheduler.waiting) == [second, third]


class _SmallVerifier(_FakeVerifier):
    """A verifier with `slots` sequence slots that refuses a prefill that does not fit (as the real one)."""

    def __init__(self, slots):
        super().__init__()
        self.slots, self.live, self.refused = slots, set(), 0

    async def Prefill(self, request, timeout=None, metadata=None):
        if len(request.items) > self.slots - len(self.live):
            self.refused += 1
            raise _RpcFailure(grpc.StatusCode.RESOURCE_EXHAUSTED, "no free slot")
        self.live.update(item.request_id for item in request.items)
        return await super().Prefill(request, timeout)

    async def Release(self, request, timeout=None):
        self.live.difference_update(request.request_ids)
        return await super().Release(request, timeout)


def test_a_full_verifier_makes_requests_wait_not_fail():
    """The verifier may be shared or still hold state: a refused prefill puts the requests back in the
    queue, admission shrinks, and every request is served once slots free up."""
    verifier = _SmallVerifier(slots=2)
    limits = Limits(max_context=64, vocab_size=100, eos_ids=frozenset(), max_sequences=8)
    scheduler = Scheduler(verifier=verifier, drafters={}, limits=limits, max_batch=8)
    requests = [_state([1, 2], _params(max_tokens=3), rid=f"q{i}") for i in range(5)]

    async def serve():
        for request in requests:
            scheduler.submit(request)
        for _ in range(200):
            if not scheduler.waiting and not scheduler.running:
                return
            await scheduler.iterate()

    asyncio.run(serve())
    assert verifier.refused >= 1
    assert all(r.finish_reason == router_pb2.FINISH_REASON_LENGTH and r.generated == 3 for r in requests)
    assert not verifier.live and sorted(verifier.released) == sorted(r.id for r in requests)
