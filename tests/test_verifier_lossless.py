"""Lossless verification: whatever is proposed, the verifier emits exactly the target's greedy output.

The reference is transformers' own `generate(do_sample=False)` of the same model. Proposals are built
from that reference so each one is right, partly right or wrong by construction, and we also assert
how many tokens were accepted (so a verifier that rejected everything would fail too).
"""

from __future__ import annotations

import random

import pytest

from smartspec.runtime.loading import load_causal_lm
from smartspec.runtime.runner import BatchedRunner
from tests.support import first_mismatch, reference_greedy
from verifier_svc.engine import VerifierEngine

NEW_TOKENS = 28


def make_engine(model_path, max_sequences: int = 8) -> VerifierEngine:
    model = load_causal_lm(model_path)
    return VerifierEngine(BatchedRunner(model, max_sequences=max_sequences, max_context=512), model.config.vocab_size)


def random_prompts(lengths: list[int], seed: int, vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def proposal(kind: str, ref: list[int], done: int, k: int, rng: random.Random) -> tuple[list[int], int]:
    """A k-token proposal after `done` committed output tokens, and how many of it must be accepted."""
    right = ref[done : done + k]
    if kind == "right":
        return right, len(right)
    if kind == "wrong":
        return [(t + 1 + rng.randrange(100)) % 49152 for t in right], 0
    # partly right: the first j tokens are correct, the next is wrong, the rest arbitrary
    j = rng.randrange(len(right)) if right else 0
    wrong = [(t + 7) % 49152 for t in right[j:]]
    return right[:j] + wrong, j


def drive(engine: VerifierEngine, ids: list[str], refs: dict[str, list[int]], outputs: dict[str, list[int]], rng, kinds, max_k=5) -> None:
    """Runs Verify steps over `ids` until each has len(ref) tokens, checking acceptance counts."""
    while True:
        active = [i for i in ids if len(outputs[i]) < len(refs[i])]
        if not active:
            return
        drafts, expected = [], []
        for i in active:
            kind = rng.choice(kinds)
            draft, accept = proposal(kind, refs[i], len(outputs[i]), rng.randrange(0, max_k + 1), rng)
            drafts.append(draft)
            expected.append(accept)
        outcome = engine.verify(active, drafts)
        assert outcome.accepted == expected
        for i, emitted in zip(active, outcome.emitted):
            outputs[i].extend(emitted)


@pytest.fixture(scope="module")
def tiny_engine(tiny_target):
    return make_engine(tiny_target)


def test_ragged_batch_with_mixed_proposals_equals_generate(tiny_target, tiny_engine):
    prompts = random_prompts([1, 5, 37, 150, 9], seed=1)
    ids = [f"r{i}" for i in range(len(prompts))]
    refs, gaps = {}, {}
    for i, prompt in zip(ids, prompts):
        refs[i], gaps[i] = reference_greedy(tiny_target, prompt, NEW_TOKENS)
    first, _ = tiny_engine.prefill(list(zip(ids, prompts)))
    outputs = {i: [t] for i, t in zip(ids, first)}
    drive(tiny_engine, ids, refs, outputs, random.Random(2), kinds=["right", "partly", "wrong", "right"])
    for i in ids:
        assert first_mismatch(outputs[i][: len(refs[i])], refs[i], gaps[i]) is None, (i, first_mismatch(outputs[i][: len(refs[i])], refs[i], gaps[i]))
    assert tiny_engine.release(ids) == len(ids)


def test_many_rejections_in_a_row_then_exact(tiny_target, tiny_engine):
    prompt = random_prompts([23], seed=3)[0]
    ref, gaps = reference_greedy(tiny_target, prompt, NEW_TOKENS)
    first, _ = tiny_engine.prefill([("rej", prompt)])
    outputs = {"rej": list(first)}
    rng = random.Random(4)
    for _ in range(12):  # every step proposes 5 wrong tokens: the KV must be cut back each time
        draft, _ = proposal("wrong", ref + [0] * 8, len(outputs["rej"]), 5, rng)
        outcome = tiny_engine.verify(["rej"], [draft])
        assert outcome.accepted == [0]
        outputs["rej"].extend(outcome.emitted[0])
    drive(tiny_engine, ["rej"], {"rej": ref}, outputs, rng, kinds=["right"])
    assert first_mismatch(outputs["rej"][: len(ref)], ref, gaps) is None
    assert tiny_engine.runner.length("rej") == len(prompt) + len(outputs["rej"]) - 1  # pending token not cached
    tiny_engine.release(["rej"])


def test_requests_join_and_leave_between_steps(tiny_target, tiny_engine):
    """Continuous batching: admissions and releases move KV slots; survivors stay exact."""
    prompts = random_prompts([12, 60, 3, 31], seed=5)
    ids = ["a", "b", "c", "d"]
    refs, gaps = {}, {}
    for i, prompt in zip(ids, prompts):
        refs[i], gaps[i] = reference_greedy(tiny_target, prompt, NEW_TOKENS)
    rng = random.Random(6)
    outputs: dict[str, list[int]] = {}
    first, _ = tiny_engine.prefill([("a", prompts[0]), ("b", prompts[1])])
    outputs.update(a=[first[0]], b=[first[1]])
    short = {i: refs[i][:8] for i in ids}
    drive(tiny_engine, ["a", "b"], short, outputs, rng, kinds=["right", "partly"])
    first, _ = tiny_engine.prefill([("c", prompts[2]), ("d", prompts[3])])
    outputs.update(c=[first[0]], d=[first[1]])
    assert tiny_engine.release(["a"]) == 1  # frees slot 0: the last slot moves into it
    drive(tiny_engine, ["b", "c", "d"], refs, outputs, rng, kinds=["right", "partly", "wrong"])
    for i in ["b", "c", "d"]:
        assert first_mismatch(outputs[i][: len(refs[i])], refs[i], gaps[i]) is None, i
    tiny_engine.release(["b", "c", "d"])
    assert tiny_engine.runner.live == 0 and tiny_engine.runner.used_tokens == 0


@pytest.mark.slow
def test_embedded_smollm2_is_lossless(embedded):
    """The real model: text prompts of different lengths batched, mixed proposals, exact output."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(embedded.target)
    texts = [
        "Once upon a time,",
        "def fibonacci(n):\n",
        "The quick brown fox jumps over the lazy dog. " * 6 + "Repeat the sentence above:",
    ]
    engine = make_engine(embedded.target, max_sequences=4)
    ids = [f"t{i}" for i in range(len(texts))]
    prompts = [tokenizer(text).input_ids for text in texts]
    refs, gaps = {}, {}
    for i, prompt in zip(ids, prompts):
        refs[i], gaps[i] = reference_greedy(embedded.target, prompt, 20)
    first, _ = engine.prefill(list(zip(ids, prompts)))
    outputs = {i: [t] for i, t in zip(ids, first)}
    drive(engine, ids, refs, outputs, random.Random(7), kinds=["right", "partly", "wrong"], max_k=4)
    for i in ids:
        assert first_mismatch(outputs[i][: len(refs[i])], refs[i], gaps[i]) is None, (i, first_mismatch(outputs[i][: len(refs[i])], refs[i], gaps[i]))
