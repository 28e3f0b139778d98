"""Sampling through the whole stack (router -> drafters -> verifier over loopback): speculation must not
change the output distribution, and seeds must reproduce.

The statistical test: from one fixed prompt, N requests with seeds 0..N-1 generate 4 tokens each
(temperature 0.9, top_k 4, top_p 0.95). The first token comes from prefill; tokens 2 to 4 come from
verify steps, where the drafts are. The empirical joint distribution of the 4 tokens is compared with
the target's exact joint distribution, enumerated with transformers (Pearson chi-square, cells
expected fewer than 5 times pooled). Each comparison fails at p < ALPHA = 1e-3, so a correct sampler
would fail one of the five configurations with probability under 0.5% for a random choice of seeds
(measured: p-values 0.36 to 0.74 at 1,000 samples, and 1e-24 to 1e-34 for the wrong rule);
the seeds are fixed, so the outcome is the same every run. The same test applied with a deliberately
wrong acceptance rule (on rejection, sample from p instead of the residual) must fail, so the test has
power; and the runs must have had both accepted and rejected drafts.

The target is the tiny test Llama with its attention output zeroed, so that its next-token
distribution depends on the last token only: a prompt can then hold, for each likely first token, a
continuation the target also likes, and prompt lookup proposes tokens that are accepted about half the
time (with a random model's attention, n-gram matches almost never happen). The draft model is that
target with its final norm perturbed: a draft that is close but not equal (acceptance 0.3-0.9).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from smartspec.wire import router_pb2
from tests.support import goodness_of_fit
from tests.test_router_stack import RouterThread, generate_many, serve_drafter, tokenizer_for
from tests.test_sampling import _wrong_residual

ALPHA = 1e-3
SAMPLES = 600
NEW_TOKENS = 4
TEMPERATURE, TOP_K, TOP_P = 0.9, 4, 0.95
BATCH = 128  # requests per step: large, so that thousands of samples take few steps


# --- models -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bigram_target(tmp_path_factory, tiny_target) -> Path:
    """The tiny target with attention switched off: next-token probabilities depend on the last token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_target, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    dest = tmp_path_factory.mktemp("bigram_target")
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(tiny_target).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def near_draft(tmp_path_factory, bigram_target) -> Path:
    """The bigram target with its final norm scaled by 1 + N(0, 0.2): close to it, never equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(bigram_target, dtype=torch.float32)
    with torch.no_grad():
        weight = model.model.norm.weight
        weight.mul_(1 + 0.2 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(5)))
    dest = tmp_path_factory.mktemp("near_draft")
    model.save_pretrained(dest)
    AutoTokenizer.from_pretrained(bigram_target).save_pretrained(dest)
    return dest


class Reference:
    """The target's exact sampling distribution, from transformers' forward and its own warpers."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoModelForCausalLM, LogitsProcessorList
        from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.eos = set(self.model.generation_config.eos_token_id if isinstance(self.model.generation_config.eos_token_id, list) else [self.model.generation_config.eos_token_id])
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(TEMPERATURE), TopKLogitsWarper(TOP_K), TopPLogitsWarper(TOP_P)])

    @torch.no_grad()
    def next_probs(self, contexts: list[list[int]]) -> torch.Tensor:
        """[len(contexts), vocab]; the contexts have equal lengths."""
        logits = self.model(torch.tensor(contexts)).logits[:, -1]
        return torch.softmax(self.warpers(torch.tensor(contexts), logits), dim=-1)

    def joint(self, prompt: list[int], depth: int) -> dict[tuple[int, ...], float]:
        """Probability of every output of up to `depth` tokens (shorter when it ends with an
        end-of-sequence token), by enumeration: one batched forward per depth."""
        frontier: dict[tuple[int, ...], float] = {(): 1.0}
        finished: dict[tuple[int, ...], float] = {}
        for _ in range(depth):
            outputs = list(frontier)
            grown: dict[tuple[int, ...], float] = {}
            for output, row in zip(outputs, self.next_probs([prompt + list(o) for o in outputs])):
                for token in torch.nonzero(row).flatten().tolist():
                    (finished if token in self.eos else grown)[(*output, token)] = frontier[output] * float(row[token])
            frontier = grown
        return {**finished, **frontier}

    def lookup_friendly_prompt(self, tokenizer, base_text: str) -> str:
        """base_text preceded by, for each of the target's likely first tokens, that token and the
        target's favourite token after it: prompt lookup (n >= 1) then proposes a continuation the
        target likes. Exact for a last-token-only target; checked to survive tokenization."""
        base = tokenizer(base_text).input_ids
        pairs: list[int] = []
        for first in torch.topk(self.next_probs([base])[0], TOP_K).indices.tolist():
            pairs += [first, int(self.next_probs([base + [first]])[0].argmax())]
        text = tokenizer.decode(pairs + base)
        assert tokenizer(text).input_ids == pairs + base, "the crafted prompt does not survive tokenization; pick another base text"
        return text


# --- the stack ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sampling_stack(bigram_target, near_draft):
    from drafter_svc.main import build_servicer as build_drafter
    from verifier_svc.main import build_servicer as build_verifier
    from verifier_svc.server import SERVICE_NAME
    from smartspec.wire import verifier_pb2_grpc
    from tests.support import ServerThread

    servicer = build_verifier(str(bigram_target), max_sequences=BATCH)
    verifier = ServerThread(lambda s: verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, s), [SERVICE_NAME])
    drafters = {
        "prompt_lookup": serve_drafter(build_drafter("prompt_lookup")),
        "draft_model": serve_drafter(build_drafter("draft_model", draft_model=str(near_draft), max_sequences=BATCH)),
    }
    router = RouterThread(
        tokenizer_for(str(bigram_target)), verifier.address, {name: d.address for name, d in drafters.items()},
        max_batch=BATCH, max_queue=SAMPLES + 16, drafter_timeout_s=30.0,
    )
    reference = Reference(bigram_target)
    prompt = reference.lookup_friendly_prompt(tokenizer_for(str(bigram_target)), "The quick brown fox jumps over the lazy dog")
    yield router, reference, prompt
    router.stop()
    for server in (verifier, *drafters.values()):
        server.stop()


def sample(router, prompt: str, drafter: str, policy: str, seeds: range, **extra) -> tuple[Counter, int, int]:
    """Runs one request per seed; returns the outputs' counts and the drafts proposed and accepted."""
    requests = [
        router_pb2.GenerateRequest(
            prompt=prompt, max_tokens=NEW_TOKENS, drafter=drafter, policy=policy, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P, seed=seed, **extra
        )
        for seed in seeds
    ]
    replies = []
    for start in range(0, len(requests), 4 * BATCH):  # waves: full batches, but not thousands of streams at once
        replies += generate_many(router.stub, requests[start : start + 4 * BATCH], timeout=300)
    failed = [r for r in replies if not isinstance(r, router_pb2.GenerateResponse)]
    assert not failed, failed[0]
    return (
        Counter(tuple(r.token_ids) for r in replies),
        sum(r.stats.proposed for r in replies),
        sum(r.stats.accepted for r in replies),
    )


CONFIGS = [("none", "none"), ("prompt_lookup", "fixed:1"), ("prompt_lookup", "fixed:3"), ("draft_model", "fixed:1"), ("draft_model", "fixed:3")]


@pytest.mark.parametrize("drafter,policy", CONFIGS, ids=[f"{d}-{p}" for d, p in CONFIGS])
def test_speculation_keeps_the_target_distribution(sampling_stack, drafter, policy):
    router, reference, prompt = sampling_stack
    expected = reference.joint(router.servicer.validate.encoder.text(prompt), NEW_TOKENS)
    counts, proposed, accepted = sample(router, prompt, drafter, policy, range(SAMPLES))
    statistic, dof, p_value = goodness_of_fit(counts, expected)
    assert p_value > ALPHA, f"{drafter} {policy}: chi-square {statistic:.1f} on {dof} dof, p = {p_value:.2e}"
    if drafter != "none":  # both outcomes happened often, so the acceptance rule was really exercised
        assert 0.1 * proposed < accepted < 0.9 * proposed, (proposed, accepted)
        assert proposed >= SAMPLES


@pytest.mark.parametrize("drafter,policy", [("prompt_lookup", "fixed:1"), ("draft_model", "fixed:3")])
def test_a_wrong_acceptance_rule_fails_the_same_test(sampling_stack, drafter, policy, monkeypatch):
    from verifier_svc import acceptance

    router, reference, prompt = sampling_stack
    expected = reference.joint(router.servicer.validate.encoder.text(prompt), NEW_TOKENS)
    monkeypatch.setattr(acceptance, "residual", _wrong_residual)
    counts, _, _ = sample(router, prompt, drafter, policy, range(SAMPLES))
    statistic, dof, p_value = goodness_of_fit(counts, expected)
    assert p_value < ALPHA, f"the wrong rule passed: chi-square {statistic:.1f} on {dof} dof, p = {p_value:.2e}"


def test_a_seed_reproduces_its_output_whatever_the_batch(sampling_stack):
    router, _, prompt = sampling_stack
    params = dict(prompt=prompt, max_tokens=12, temperature=TEMPERATURE, top_k=TOP_K, top_p=TOP_P)
    for drafter, policy in [("draft_model", "fixed:3"), ("prompt_lookup", "fixed:2"), ("none", "none")]:
        alone = router.stub.Generate(router_pb2.GenerateRequest(drafter=drafter, policy=policy, seed=42, **params), timeout=60)
        crowd = [router_pb2.GenerateRequest(drafter=drafter, policy=policy, seed=s, **params) for s in range(40, 60)]
        batched = generate_many(router.stub, crowd)
        assert list(batched[2].token_ids) == list(alone.token_ids), drafter  # seed 42 among 19 others
        assert alone.stats.seed == 42
        assert len({tuple(r.token_ids) for r in batched}) > 10  # different seeds, different outputs
    unseeded = [router.stub.Generate(router_pb2.GenerateRequest(drafter="none", **params), timeout=60) for _ in range(2)]
    assert unseeded[0].stats.seed != unseeded[1].stats.seed  # a random seed each, reported back
    again = router.stub.Generate(router_pb2.GenerateRequest(drafter="none", seed=unseeded[0].stats.seed, **params), timeout=60)
    assert list(again.token_ids) == list(unseeded[0].token_ids)


def test_bad_sampling_values_are_refused_with_the_value_named(sampling_stack):
    import grpc

    router, _, prompt = sampling_stack
    for fields, words in [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=1.0, top_p=0.0), "top_p"),
        (dict(temperature=1.0, top_p=1.01), "top_p"),
        (dict(temperature=1.0, top_k=-3), "top_k"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            router.stub.Generate(router_pb2.GenerateRequest(prompt=prompt, max_tokens=2, **fields), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
