"""End to end over loopback with the tree drafter: exact greedy output under fixed node budgets and the
goodput controller, batched with chain drafters; the controller's calibration learns from verified
trees; sampling requests cannot use trees; a drafter's malformed or misplaced trees cost only
speculation."""

from __future__ import annotations

import grpc
import pytest

from smartspec.wire import drafter_pb2, drafter_pb2_grpc, router_pb2
from tests.support import reference_greedy
from tests.test_router_lossless import PROMPTS, assert_lossless
from tests.test_router_stack import RouterThread, generate_many, real_drafters, serve_drafter, tokenizer_for, verifier_for

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tree_servers(tiny_target, tiny_draft):
    """A tree drafter on the often-wrong tiny draft, and one on the target itself (its best path is
    always right, its other branches are the target's runners-up)."""
    from drafter_svc.main import build_servicer

    servers = {
        "tree": serve_drafter(build_servicer("tree", draft_model=str(tiny_draft), branching=3)),
        "self_tree": serve_drafter(build_servicer("tree", draft_model=str(tiny_target), branching=2)),
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def router(tiny_target, tiny_draft, tree_servers):
    drafters = {**real_drafters(str(tiny_target), str(tiny_draft)), **{name: s.address for name, s in tree_servers.items()}}
    router = RouterThread(tokenizer_for(str(tiny_target)), verifier_for(str(tiny_target)).address, drafters, cost_profile="off")
    yield router
    router.stop()


@pytest.fixture(scope="module")
def refs(tiny_target):
    tokenizer = tokenizer_for(str(tiny_target))
    return {name: reference_greedy(tiny_target, tokenizer(text).input_ids, MAX_TOKENS) for name, text in PROMPTS.items()}


def test_the_drafter_service_sends_bushy_trees(tree_servers, tiny_target):
    tokenizer = tokenizer_for(str(tiny_target))
    ids = tokenizer(PROMPTS["medium"]).input_ids
    with grpc.insecure_channel(tree_servers["tree"].address) as channel:
        reply = drafter_pb2_grpc.DrafterServiceStub(channel).Propose(
            drafter_pb2.ProposeRequest(request_ids=["x"], committed_lengths=[len(ids)], appended_counts=[len(ids)], appended_token_ids=ids, max_draft_tokens=[8])
        )
        drafter_pb2_grpc.DrafterServiceStub(channel).Release(drafter_pb2.ReleaseRequest(request_ids=["x"]))
    assert list(reply.draft_counts) == [8] and len(reply.draft_parents) == 8 and len(reply.draft_token_probs) == 8
    parents = list(reply.draft_parents)
    assert parents != list(range(-1, 7)), "a chain: the wire would not carry a tree"
    assert all(-1 <= p < i for i, p in enumerate(parents))


def test_trees_under_fixed_budgets_and_goodput_batched_with_chains_are_exact(router, refs):
    combos = [(name, drafter, policy) for name in PROMPTS for drafter, policy in (
        ("tree", "fixed:1"), ("tree", "fixed:4"), ("tree", "fixed:8"), ("tree", "goodput"),
        ("self_tree", "fixed:1"), ("self_tree", "fixed:5"), ("self_tree", "goodput"),
        ("draft_model", "fixed:3"), ("self_draft", "fixed:3"), ("prompt_lookup", "fixed:3"),
    )]
    requests = [router_pb2.GenerateRequest(prompt=PROMPTS[name], max_tokens=MAX_TOKENS, drafter=drafter, policy=policy) for name, drafter, policy in combos]
    replies = generate_many(router.stub, requests)
    per: dict[tuple[str, str], list[int]] = {}
    for (name, drafter, policy), reply in zip(combos, replies):
        assert isinstance(reply, router_pb2.GenerateResponse), f"{name}/{drafter}/{policy}: {reply}"
        assert_lossless(reply.token_ids, *refs[name], f"{name}/{drafter}/{policy}")
        stats = reply.stats
        if policy.startswith("fixed:"):
            assert stats.proposed <= int(policy.removeprefix("fixed:")) * stats.steps
        sums = per.setdefault((drafter, policy), [0, 0, 0])
        sums[0] += stats.proposed
        sums[1] += stats.accepted
        sums[2] += stats.steps
    proposed, accepted, steps = per[("self_tree", "fixed:5")]
    assert accepted >= 2 * steps, f"a tree whose best path is always right accepted only {accepted} in {steps} steps"
    proposed, accepted, _ = per[("tree", "fixed:8")]
    assert proposed > 0 and accepted < proposed, "the often-wrong tree drafter was not exercised"
    controller = router.servicer.scheduler.controller
    assert controller.calibrations["self_tree"].observed > 0 and controller.calibrations["tree"].observed > 0


def test_sampling_requests_cannot_use_the_tree_drafter(router):
    with pytest.raises(grpc.RpcError) as err:
        router.stub.Generate(router_pb2.GenerateRequest(prompt="Hi", max_tokens=4, drafter="tree", temperature=0.7))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "verified greedily only" in err.value.details() and "tree" in err.value.details()
    # 'auto' weighs the tree drafter for greedy requests only
    controller = router.servicer.scheduler.controller
    offered: dict[bool, set[str]] = {True: set(), False: set()}
    choose = controller.choose_drafter

    def recording(request_id, drafters, cap, context_tokens):
        offered[request_id in greedy_ids].update(drafters)
        return choose(request_id, drafters, cap, context_tokens)

    greedy_ids: set[str] = set()
    original = router.servicer.scheduler.submit

    def submit(state):
        if state.params.sampling.greedy:
            greedy_ids.add(state.id)
        original(state)

    controller.choose_drafter, router.servicer.scheduler.submit = recording, submit
    try:
        replies = generate_many(router.stub, [
            router_pb2.GenerateRequest(prompt="Hi", max_tokens=6, drafter="auto", temperature=0.7, seed=4),
            router_pb2.GenerateRequest(prompt="Hi", max_tokens=6, drafter="auto"),
        ])
    finally:
        controller.choose_drafter, router.servicer.scheduler.submit = choose, original
    assert all(isinstance(r, router_pb2.GenerateResponse) and len(r.token_ids) == 6 for r in replies), replies
    assert "tree" in offered[True] and "draft_model" in offered[False] and "tree" not in offered[False]


class TreeScriptedDrafter(drafter_pb2_grpc.DrafterServiceServicer):
    """Proposes a wrong star of k tokens for every request; 'bad' sends parents that are no tree."""

    def __init__(self, bad: bool) -> None:
        self.bad = bad
        self.calls = 0

    async def Propose(self, request, context):
        self.calls += 1
        counts, flat, parents, start = [], [], [], 0
        for count, k in zip(request.appended_counts, request.max_draft_tokens):
            last = request.appended_token_ids[start + count - 1] if count else 1
            start += count
            counts.append(k)
            flat += [(last + 7 + j) % 49152 for j in range(k)]
            parents += [0] * k if self.bad else [-1] * k
        n = len(request.request_ids)
        return drafter_pb2.ProposeResponse(
            statuses=[drafter_pb2.PROPOSE_STATUS_OK] * n, draft_counts=counts, draft_token_ids=flat, draft_parents=parents
        )

    async def Release(self, request, context):
        return drafter_pb2.ReleaseResponse(released=0)

    async def Info(self, request, context):
        return drafter_pb2.InfoResponse(kind="scripted-tree")


@pytest.mark.parametrize("bad", [True, False])
def test_malformed_or_misplaced_trees_cost_only_speculation(tiny_target, refs, bad):
    """bad: trees that are no trees make the drafter fail (backoff), the requests go on without
    speculation. Not bad: a tree for a sampling request is cut to its chain start before the verifier
    (which would refuse the whole batch's Verify), while a greedy request beside it verifies its star."""
    scripted = TreeScriptedDrafter(bad)
    server = serve_drafter(scripted)
    router = RouterThread(tokenizer_for(str(tiny_target)), verifier_for(str(tiny_target)).address, {"scripted": server.address},
                          drafter="scripted", policy="fixed:3", cost_profile="off")
    try:
        requests = [router_pb2.GenerateRequest(prompt=PROMPTS["medium"], max_tokens=MAX_TOKENS),
                    router_pb2.GenerateRequest(prompt=PROMPTS["short"], max_tokens=8, temperature=0.9, seed=5)]
        greedy, sampled = generate_many(router.stub, requests)
        assert isinstance(greedy, router_pb2.GenerateResponse), greedy
        assert isinstance(sampled, router_pb2.GenerateResponse) and len(sampled.token_ids) == 8, sampled
        assert_lossless(greedy.token_ids, *refs["medium"], "scripted tree")
        assert scripted.calls > 0
        if bad:
            assert greedy.stats.proposed == 0 and router.servicer.scheduler.drafters["scripted"].failures > 0
        else:
            assert greedy.stats.proposed > 2 * greedy.stats.steps  # whole stars were verified (less only near max_tokens)
            assert sampled.stats.proposed <= sampled.stats.steps  # only the star's first node: a chain of one
    finally:
        router.stop()
        server.stop()
