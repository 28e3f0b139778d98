"""What sampling requests put on the wire, and what truncating the draft distribution to its top N costs.

    python bench/draft_wire_size.py [--out bench/results/draft_wire_size.json]

1. Bytes of a ProposeResponse (and the same distributions in the VerifyRequest) for a batch of B requests
   with k draft tokens each: deterministic drafts (no distributions), the draft distribution truncated to
   its top N (token id + float32 per entry), and a dense float32 vocabulary row per draft token.
2. On the embedded target/draft pair at temperature 1 over the shipped prompts: the draft probability
   mass inside the top N, and the expected acceptance of one draft token, sum(min(p, q)), with q
   truncated to N versus the whole q. Truncation is exact either way (the drafter samples from what it
   sends); it only changes how often drafts are accepted.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from smartspec.sampling import DraftDistribution, SamplingParams, pack_distributions
from smartspec.wire import drafter_pb2

VOCAB = 49152
TOP_NS = (8, 16, 64, 256)


def response_bytes(batch: int, k: int, top_n: int | None, rng: random.Random) -> int:
    """Serialized size of a ProposeResponse; top_n None = deterministic, 0 = dense vocabulary rows."""
    message = drafter_pb2.ProposeResponse(
        statuses=[drafter_pb2.PROPOSE_STATUS_OK] * batch,
        draft_counts=[k] * batch,
        draft_token_ids=[rng.randrange(VOCAB) for _ in range(batch * k)],
    )
    if top_n is None:
        return message.ByteSize()
    size = VOCAB if top_n == 0 else top_n
    dists = [[DraftDistribution(tuple(rng.sample(range(VOCAB), size)), tuple([1.0 / size] * size)) for _ in range(k)] for _ in range(batch)]
    if top_n == 0:  # dense: the probabilities alone, one packed float32 per vocabulary entry
        return message.ByteSize() + batch * k * (4 * VOCAB + 4)
    message.draft_distributions.CopyFrom(pack_distributions(dists))
    return message.ByteSize()


def truncation_effect(max_positions: int) -> list[dict]:
    from smartspec.bench.workload import load_prompts
    from smartspec.models import embedded_paths
    from smartspec.runtime.sampler import draft_distribution, processed_probs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = embedded_paths()
    tokenizer = AutoTokenizer.from_pretrained(paths.target)
    target = AutoModelForCausalLM.from_pretrained(paths.target, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(paths.draft, dtype=torch.float32).eval()
    params = SamplingParams(temperature=1.0)
    mass = {n: [] for n in TOP_NS}
    accept = {n: [] for n in (*TOP_NS, 0)}
    prompts = [*load_prompts("chat")[:3], *load_prompts("copy")[:3]]
    for prompt in prompts:
        messages = [{"role": role, "content": content} for role, content in prompt.messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tokenizer(text).input_ids[:256]])
        with torch.no_grad():
            p = processed_probs(target(ids).logits[0, -max_positions:], params)  # [positions, vocab]
            draft_logits = draft(ids).logits[0, -max_positions:]  # [positions, vocab]
            q = processed_probs(draft_logits, params)
        for p_row, q_row, q_logits in zip(p, q, draft_logits):
            accept[0].append(float(torch.minimum(p_row, q_row).sum()))
            for n in TOP_NS:
                mass[n].append(float(torch.topk(q_row, n).values.sum()))
                dist = draft_distribution(q_logits, params, n)
                q_n = torch.zeros_like(q_row)
                q_n[list(dist.token_ids)] = torch.tensor(dist.probs)
                accept[n].append(float(torch.minimum(p_row, q_n).sum()))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rows = [{"top_n": n, "draft_mass_kept": mean(mass[n]), "acceptance": mean(accept[n])} for n in TOP_NS]
    rows.append({"top_n": "all", "draft_mass_kept": 1.0, "acceptance": mean(accept[0])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=32, help="positions per prompt for the truncation measurement")
    parser.add_argument("--out", default="bench/results/draft_wire_size.json")
    args = parser.parse_args()
    rng = random.Random(0)
    sizes = []
    print(f"{'batch':>5} {'k':>2} {'deterministic':>13} {'top-16':>9} {'top-64':>9} {'top-256':>9} {'dense row':>12}  (bytes)")
    for batch in (1, 8, 32):
        for k in (1, 4, 8):
            row = {"batch": batch, "k": k, "deterministic": response_bytes(batch, k, None, rng)}
            for n in (16, 64, 256):
                row[f"top_{n}"] = response_bytes(batch, k, n, rng)
            row["dense"] = response_bytes(batch, k, 0, rng)
            sizes.append(row)
            print(f"{batch:>5} {k:>2} {row['deterministic']:>13} {row['top_16']:>9} {row['top_64']:>9} {row['top_256']:>9} {row['dense']:>12}")
    truncation = truncation_effect(args.positions)
    print(f"\n{'top N':>6} {'draft mass kept':>15} {'acceptance':>10}   (embedded pair, temperature 1)")
    for row in truncation:
        print(f"{row['top_n']:>6} {row['draft_mass_kept']:>15.3f} {row['acceptance']:>10.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bytes": sizes, "truncation": truncation}, indent=2) + "\n")
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
