"""The flat ragged runner and its paged KV cache, against plain forwards of each sequence on its own.

The cases are those a padded layout could hide: a long prompt prefilled beside short ones, contexts that
differ tenfold in one step, a token tree beside many rows verifying nothing, and blocks handed back and
reused by other sequences between steps.
"""

from __future__ import annotations

import random

import pytest
import torch

from smartspec.runtime.kv_pool import KVCacheFull
from smartspec.runtime.loading import load_causal_lm
from smartspec.runtime.runner import BatchedRunner, StepRow, group_rows
from tests.support import build_tiny_model, reference_model


@pytest.fixture(scope="module")
def long_target(tmp_path_factory, embedded):
    """The tiny test Llama with room for a 1,000-token prompt."""
    return build_tiny_model(tmp_path_factory.mktemp("long_target"), embedded.target, seed=0, layers=2, max_positions=2048)


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 49152) for _ in range(n)]


def expected_logits(model_path, context: list[int], new: list[int]) -> torch.Tensor:
    """The reference model's logits for the last len(new) positions of context + new ([len(new), vocab])."""
    with torch.inference_mode():
        return reference_model(model_path)(torch.tensor([context + new])).logits[0, -len(new) :]


def test_long_prompt_beside_short_ones_then_mixed_verification_is_exact(long_target):
    runner = BatchedRunner(load_causal_lm(long_target), max_sequences=16, max_context=2048)
    rng = random.Random(0)
    contexts = {"long": tokens(rng, 1000), **{f"s{i}": tokens(rng, 100 + i) for i in range(6)}, "tiny": tokens(rng, 3)}
    for seq in contexts:
        runner.admit(seq)
    result = runner.step([StepRow(seq, ctx, all_logits=False) for seq, ctx in contexts.items()])
    for (seq, ctx), logits in zip(contexts.items(), result.logits):
        assert torch.allclose(logits, expected_logits(long_target, ctx[:-1], ctx[-1:]), atol=1e-4), seq
    assert result.new_tokens == sum(map(len, contexts.values()))  # no padding rows: the step is its tokens

    # one step: contexts from 3 to 1,000 tokens, k = 0 .. 7, and one 8-node token tree
    counts = {seq: i % 8 + 1 for i, seq in enumerate(contexts)}
    new = {seq: tokens(rng, counts[seq]) for seq in contexts}
    tree = [-1, 0, 0, 1, 1, 2, 3, 3]  # "tiny" verifies a tree: siblings share a depth
    new["tiny"] = tokens(rng, len(tree))
    rows = [StepRow(seq, new[seq], parents=tree if seq == "tiny" else None) for seq in contexts]
    result = runner.step(rows)
    for row, logits in zip(rows, result.logits):
        if row.parents is None:
            assert torch.allclose(logits, expected_logits(long_target, contexts[row.seq_id], row.tokens), atol=1e-4), row.seq_id
    # each tree node sees exactly its ancestors: compare with the chain root -> node
    for node in range(len(tree)):
        path = [node]
        while tree[path[-1]] >= 0:
            path.append(tree[path[-1]])
        chain = [new["tiny"][j] for j in reversed(path)]
        want = expected_logits(long_target, contexts["tiny"], chain)[-1]
        assert torch.allclose(result.logits[-1][node], want, atol=1e-4), node


def test_blocks_follow_tokens_are_freed_and_reused(tiny_target):
    runner = BatchedRunner(load_causal_lm(tiny_target), max_sequences=8, max_context=512, kv_cache_tokens=64 * 16)
    cache = runner.cache
    rng = random.Random(1)
    contexts = {"a": tokens(rng, 40), "b": tokens(rng, 17), "c": tokens(rng, 200)}
    for seq in contexts:
        runner.admit(seq)
    runner.step([StepRow(seq, ctx, all_logits=False) for seq, ctx in contexts.items()])
    held = cache.num_blocks - cache.free_blocks
    assert held == sum(-(-len(c) // cache.block_size) for c in contexts.values())  # at most one partly filled block each
    assert runner.used_tokens == 257
    runner.step([StepRow("b", tokens(rng, 8))])  # 17 + 8 = 25 tokens: still two blocks
    runner.truncate("b", 17)
    assert cache.num_blocks - cache.free_blocks == held
    assert runner.release("c")
    assert cache.free_blocks == cache.num_blocks - 3 - 2  # "c"'s 13 blocks are back
    # a new sequence reuses "c"'s blocks; survivors keep exact logits
    runner.admit("d")
    contexts["d"] = tokens(rng, 150)
    runner.step([StepRow("d", contexts["d"], all_logits=False)])
    new = {seq: tokens(rng, 3) for seq in ("a", "b", "d")}
    result = runner.step([StepRow(seq, new[seq]) for seq in new])
    for seq, logits in zip(new, result.logits):
        assert torch.allclose(logits, expected_logits(tiny_target, contexts[seq], new[seq]), atol=1e-4), seq


def test_a_step_the_cache_cannot_hold_changes_nothing(tiny_target):
    runner = BatchedRunner(load_causal_lm(tiny_target), max_sequences=8, max_context=512, kv_cache_tokens=4 * 16)
    rng = random.Random(2)
    runner.admit("a")
    runner.admit("b")
    context = tokens(rng, 40)
    runner.step([StepRow("a", context, all_logits=False)])  # 3 of 4 blocks
    free = runner.cache.free_blocks
    assert free == 1  # "b" needs 2 blocks for 20 tokens
    with pytest.raises(KVCacheFull, match="free"):
        runner.step([StepRow("a", tokens(rng, 2)), StepRow("b", tokens(rng, 20))])
    assert runner.cache.free_blocks == free and runner.length("a") == 40 and runner.length("b") == 0
    new = tokens(rng, 2)
    result = runner.step([StepRow("a", new)])  # the cache is still consistent
    assert torch.allclose(result.logits[0], expected_logits(tiny_target, context, new), atol=1e-4)


def test_attention_runs_the_fused_cpu_kernel_without_repeating_kv_heads(tiny_target):
    """The point of calling SDPA ourselves: grouped-query attention on the fused kernel, with a mask,
    and no per-layer copy of the KV heads for every query head."""
    from torch.profiler import ProfilerActivity, profile

    runner = BatchedRunner(load_causal_lm(tiny_target), max_sequences=8, max_context=512)
    rng = random.Random(3)
    for seq, n in (("a", 30), ("b", 90), ("c", 5)):
        runner.admit(seq)
        runner.step([StepRow(seq, tokens(rng, n), all_logits=False)])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step([StepRow("a", tokens(rng, 4)), StepRow("b", tokens(rng, 4)), StepRow("c", tokens(rng, 1))])
    names = {event.name for event in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert not any("repeat_interleave" in name or name == "aten::repeat" for name in names), sorted(n for n in names if "repeat" in n)


def test_groups_bound_key_padding_and_keep_equal_new_token_counts():
    rows = [(1, 100), (1, 1000), (1, 950), (8, 120), (1, 90), (8, 130), (1, 10)]
    groups = group_rows(rows, padding=0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(rows)))
    for group in groups:
        assert len({rows[i][0] for i in group}) == 1
        longest = max(rows[i][1] for i in group)
        assert longest * len(group) <= 1.25 * sum(rows[i][1] for i in group)
    assert [1, 2] in groups and [5, 3] in groups  # similar contexts share a call
