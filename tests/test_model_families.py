"""The decoder families users bring are served exactly: Llama, Qwen2, Qwen3, Mistral, Phi-3, OLMo-2,
Gemma 2 and Gemma 3 (text), each a tiny random-initialised folder built with transformers' own classes
(tests.support.build_family_model), with what makes each family different left on: soft-capping,
query_pre_attn_scalar, q/k norms, fused qkv, and 16-token sliding windows that a 40-token context
crosses.

Greedy output through the verifier and through the whole router stack must equal transformers'
`generate()`; the runner's logits must equal the model's own forward (so whatever a model does after
its LM head, such as Gemma 2's final soft-capping, is not skipped: sampling reads these logits); and a
model the runner cannot serve exactly must be refused when it is loaded, not served wrongly.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import torch

from smartspec.wire import router_pb2
from tests.support import FAMILIES, ServerThread, build_family_model, first_mismatch, reference_greedy, reference_model
from tests.test_router_lossless import MAX_TOKENS, PROMPTS, assert_lossless, repeating_prompt
from tests.test_router_stack import RouterThread, generate_many, lookup_drafter, serve_drafter, tokenizer_for, verifier_for
from tests.test_tree_verifier import build as build_tree, expected_accept
from tests.test_verifier_lossless import drive, make_engine, random_prompts
from verifier_svc.engine import VerifierEngine

NEW_TOKENS = 16
PROMPT_LENGTHS = [3, 17, 40]  # 17 and 40 cross the 16-token sliding windows at prefill, 3 while decoding
# float32 noise between two correct computations of these logits (about 20 in size) reached 7e-5 here;
# skipping what a model does is far above it (Gemma 2 without its attention soft-capping: 6e-2, without
# its final soft-capping or its query_pre_attn_scalar: about 3).
LOGITS_ATOL = 5e-4
ROUTER_FAMILIES = ["qwen3", "gemma3"]
ROUTER_POLICY = "fixed:3"


class FamilyModels:
    """Each family's folders, built once per session on first use (a target, and a draft of the same
    family and vocabulary with other weights)."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, tokenizer_from: Path) -> None:
        self._factory = tmp_path_factory
        self._tokenizer_from = tokenizer_from
        self._built: dict[tuple[str, int], Path] = {}

    def _build(self, family: str, seed: int) -> Path:
        if (family, seed) not in self._built:
            dest = self._factory.mktemp(f"{family}_seed{seed}")
            self._built[family, seed] = build_family_model(dest, family, self._tokenizer_from, seed=seed)
        return self._built[family, seed]

    def target(self, family: str) -> Path:
        return self._build(family, seed=0)

    def draft(self, family: str) -> Path:
        return self._build(family, seed=1)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory, embedded) -> FamilyModels:
    return FamilyModels(tmp_path_factory, embedded.target)


def fresh_engine(path: Path) -> VerifierEngine:
    """A new engine per test, so that one family's failure leaves no live request behind for the next."""
    return make_engine(path, max_sequences=4)


# --- a. greedy through the verifier ----------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_through_the_verifier_equals_generate(family: str, family_models: FamilyModels) -> None:
    """A ragged batch (3, 17 and 40 tokens), one token-tree step, then chains that are right, partly
    right and wrong: every request's output equals generate() token for token, and exactly the drafts
    that agree with it are accepted."""
    target = family_models.target(family)
    engine = fresh_engine(target)
    prompts = random_prompts(PROMPT_LENGTHS, seed=21)
    ids = [f"{family}-{len(p)}" for p in prompts]
    refs, gaps = {}, {}
    for i, prompt in zip(ids, prompts):
        refs[i], gaps[i] = reference_greedy(target, prompt, NEW_TOKENS)
    first, _ = engine.prefill(list(zip(ids, prompts)))
    outputs = {i: [t] for i, t in zip(ids, first)}
    for i in ids:
        problem = first_mismatch(outputs[i], refs[i][:1], gaps[i])
        assert problem is None, f"{i}, first token after prefill: {problem}"

    rng = random.Random(22)
    trees = [build_tree(shape, refs[i][1:], rng) for i, shape in zip(ids, ("right-last", "duplicates", "wrong-top"))]
    outcome = engine.verify(ids, [tokens for tokens, _ in trees], parents=[parents for _, parents in trees])
    for i, (tokens, parents), accepted, emitted in zip(ids, trees, outcome.accepted, outcome.emitted):
        want, _ = expected_accept(tokens, parents, refs[i][1:])
        assert accepted == want, f"{i}: tree {tokens} {parents} accepted {accepted}, expected {want}"
        outputs[i].extend(emitted)

    drive(engine, ids, refs, outputs, rng, kinds=["right", "partly", "wrong", "right"])
    for i in ids:
        problem = first_mismatch(outputs[i][: len(refs[i])], refs[i], gaps[i])
        assert problem is None, f"{i}: {problem}"
    assert engine.release(ids) == len(ids)


# --- b. logits equal the model's own forward -------------------------------------------------------------
def assert_logits_equal(got: torch.Tensor, want: torch.Tensor, label: str) -> None:
    """Equal within float32 noise; the message says how far apart and where."""
    diff = (got - want).abs()
    largest = float(diff.max())
    worst = int(diff.max(dim=-1).values.argmax()) if diff.dim() > 1 else 0
    assert largest <= LOGITS_ATOL, (
        f"{label}: logits differ by up to {largest:.3e} (row {worst}; tolerance {LOGITS_ATOL:.0e}); "
        f"largest logit {float(got.abs().max()):.2f} here against {float(want.abs().max()):.2f} in the model's own forward"
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_equal_the_models_own_forward(family: str, family_models: FamilyModels) -> None:
    """The logits the verifier decides and samples from, after a batched prefill and after two chain
    verifications (the second following a partial rejection), equal `model(input_ids).logits` of the
    whole sequence at the same positions, the model's own final transforms included."""
    target = family_models.target(family)
    model = reference_model(target)
    engine = fresh_engine(target)
    prompts = random_prompts([17, 40], seed=31)
    ids = [f"{family}-logits-{len(p)}" for p in prompts]

    def forward(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([tokens])).logits[0]  # [len(tokens), vocab]

    first, step = engine.prefill(list(zip(ids, prompts)))
    for i, prompt, logits in zip(ids, prompts, step.logits):
        assert_logits_equal(logits[-1], forward(prompt)[-1], f"{i}: prefill")
    # committed: the context in the KV cache plus the pending token (the last one emitted)
    committed = {i: [*prompt, token] for i, prompt, token in zip(ids, prompts, first)}
    rng = random.Random(32)
    for round_ in range(2):
        # the model's own next token, then three random ones: one accepted, the rest rolled back
        drafts = [[int(forward(committed[i])[-1].argmax()), *(rng.randrange(3, model.config.vocab_size) for _ in range(3))] for i in ids]
        outcome = engine.verify(ids, drafts)
        for i, draft, logits in zip(ids, drafts, outcome.step.logits):
            fed = committed[i] + draft
            want = forward(fed)[len(committed[i]) - 1 :]  # after the pending token and after each draft
            assert_logits_equal(logits, want, f"{i}: verify round {round_} of {[committed[i][-1], *draft]}")
        for i, emitted in zip(ids, outcome.emitted):
            committed[i].extend(emitted)
    assert engine.release(ids) == len(ids)


# --- c. the whole stack, every drafter ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ROUTER_FAMILIES)
def test_router_output_through_every_drafter_equals_generate(family: str, family_models: FamilyModels) -> None:
    """Through router, verifier and drafters over loopback, batched together: prompt lookup, a draft
    model of the same family (other weights: often wrong) and a token tree drafted by the target itself
    (its best path is right) all give generate()'s output."""
    from drafter_svc.main import build_servicer

    target, draft = str(family_models.target(family)), str(family_models.draft(family))
    tokenizer = tokenizer_for(target)
    texts = dict(PROMPTS, repeat=repeating_prompt(Path(target), tokenizer))
    refs = {name: reference_greedy(Path(target), tokenizer(text).input_ids, MAX_TOKENS) for name, text in texts.items()}
    servers: dict[str, ServerThread] = {}
    router: RouterThread | None = None
    try:
        servers["draft_model"] = serve_drafter(build_servicer("draft_model", draft_model=draft))
        servers["tree"] = serve_drafter(build_servicer("tree", draft_model=target, branching=2))
        drafters = {"prompt_lookup": lookup_drafter().address, **{name: s.address for name, s in servers.items()}}
        router = RouterThread(tokenizer, verifier_for(target).address, drafters, cost_profile="off")
        combos = [(name, drafter) for name in texts for drafter in drafters]
        replies = generate_many(
            router.stub,
            [router_pb2.GenerateRequest(prompt=texts[name], max_tokens=MAX_TOKENS, drafter=d, policy=ROUTER_POLICY) for name, d in combos],
        )
        totals: dict[str, list[int]] = {name: [0, 0] for name in drafters}  # drafter -> [proposed, accepted]
        for (name, drafter), reply in zip(combos, replies):
            assert isinstance(reply, router_pb2.GenerateResponse), f"{family} {name}/{drafter}: {reply}"
            assert_lossless(reply.token_ids, *refs[name], f"{family} {name}/{drafter}")
            totals[drafter][0] += reply.stats.proposed
            totals[drafter][1] += reply.stats.accepted
        assert all(proposed > 0 for proposed, _ in totals.values()), f"a drafter never proposed: {totals}"
        assert totals["tree"][1] > 0, f"the target's own tree was never accepted: {totals}"
    finally:
        if router is not None:
            router.stop()
        for server in servers.values():
            server.stop()


# --- d. what cannot be served exactly is refused at load ---------------------------------------------------
def build_unservable_model(dest: Path, model_type: str) -> Path:
    """A tiny folder of an architecture a KV-cache decoder runner cannot serve: GPT-2 (outside the
    families the runner is exact for), T5 (an encoder-decoder) or Mamba (a recurrent state, no KV)."""
    import transformers

    config, cls = {
        "gpt2": (transformers.GPT2Config(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, eos_token_id=2),
                 transformers.GPT2LMHeadModel),
        "t5": (transformers.T5Config(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4), transformers.T5ForConditionalGeneration),
        "mamba": (transformers.MambaConfig(vocab_size=1000, hidden_size=64, state_size=4, num_hidden_layers=2, expand=2), transformers.MambaForCausalLM),
    }[model_type]
    torch.manual_seed(0)
    cls(config).save_pretrained(dest)
    return dest


@pytest.mark.parametrize("model_type", ["gpt2", "t5", "mamba"])
def test_a_model_the_runner_cannot_serve_exactly_is_refused_at_load(model_type: str, tmp_path: Path) -> None:
    """Loading it for serving (as the verifier and the model drafters do) raises a ValueError that names
    its model type and says it is not served, instead of failing later or serving it inexactly."""
    from smartspec.runtime.loading import load_runner

    path = build_unservable_model(tmp_path / model_type, model_type)
    with pytest.raises(ValueError) as refused:
        load_runner(str(path), "target", "cpu", "float32", 2)
    message = str(refused.value)
    assert re.search(rf"\b{re.escape(model_type)}\b", message), f"the refusal does not name model type {model_type!r}: {message}"
    assert re.search(r"serve|support", message, re.IGNORECASE), f"the refusal does not say the model is not served: {message}"
