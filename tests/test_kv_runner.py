"""The batched runner's KV pool under growth, slot moves and ragged steps, against unbatched forwards."""

from __future__ import annotations

import random

import torch

from smartspec.runtime.loading import load_causal_lm
from smartspec.runtime.runner import BatchedRunner, StepRow


def test_growth_then_release_then_step_matches_a_fresh_forward(tiny_target):
    """Storage grows inside forwards (more slots, longer rows); a release then moves a slot outside
    one. Every later step must still give each sequence the logits of a plain forward of its context."""
    model = load_causal_lm(tiny_target)
    runner = BatchedRunner(model, max_sequences=8, max_context=512)
    rng = random.Random(0)
    contexts = {f"s{i}": [rng.randrange(3, 49152) for _ in range(rng.choice([5, 300, 40]))] for i in range(6)}
    for seq in contexts:
        runner.admit(seq)
    runner.step([StepRow(seq, tokens, all_logits=False) for seq, tokens in contexts.items()])
    assert runner.pool.allocated_slots >= 6 and runner.pool.allocated_len >= 300
    assert runner.release("s1") and runner.release("s4")
    survivors = [seq for seq in contexts if seq not in ("s1", "s4")]
    new = {seq: [rng.randrange(3, 49152) for _ in range(3)] for seq in survivors}
    result = runner.step([StepRow(seq, new[seq]) for seq in survivors])
    with torch.inference_mode():
        for seq, logits in zip(survivors, result.logits):
            full = torch.tensor([contexts[seq] + new[seq]])
            expected = model(full).logits[0, -3:]
            assert torch.allclose(logits, expected, atol=1e-4), seq
    assert runner.used_tokens == sum(len(contexts[s]) + 3 for s in survivors)
