"""Accepted tokens per step on the embedded pair: token trees against chains of the same token count.

    python bench/tree_vs_chain.py [--budgets 2 4 8] [--prompts 3] [--max-tokens 48] [--branching 4]
                                  [--out bench/results/tree_vs_chain.json]

In process, with the engines the services run: the verifier (SmolLM2-135M-Instruct, float32), and the
draft_model and tree drafters on its 4-layer derived draft. For every budget k the same prompts (the
first N of each shipped set, chat template) are decoded greedily, all in one batch: once with chains
of k draft tokens (draft_model) and once with trees of k nodes (tree, branching B), so both verify the
same number of tokens per step. Every output is checked against plain decoding (no drafts). Reported
per workload: accepted drafts per request-step, tokens emitted per request-step (accepted + 1),
the drafter's forwards per step, and what the raw draft probabilities predicted for the trees.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from drafter_svc.draft_model import DraftModelDrafter
from drafter_svc.engine import DrafterEngine
from drafter_svc.tree import TreeDrafter
from router.controller.tree import path_probs
from router.validate import PromptEncoder
from smartspec.bench.workload import load_prompts
from smartspec.models import embedded_paths
from smartspec.runtime.loading import eos_ids_of, load_causal_lm
from smartspec.runtime.runner import BatchedRunner
from verifier_svc.engine import VerifierEngine


def decode(verifier: VerifierEngine, drafter: DrafterEngine | None, prompts: list[list[int]], k: int, max_tokens: int, eos: set[int]) -> dict:
    """Greedy decoding of every prompt in one batch with proposals of k tokens (or nodes) from
    `drafter` (None: plain decoding); returns the outputs and the step counts."""
    ids = [f"p{i}" for i in range(len(prompts))]
    first, _ = verifier.prefill(list(zip(ids, prompts)))
    outputs = {i: [t] for i, t in zip(ids, first)}
    committed = {i: [*p, t] for i, p, t in zip(ids, prompts, first)}
    sent = dict.fromkeys(ids, 0)
    totals = dict(request_steps=0, proposed=0, accepted=0, draft_forwards=0, steps=0, draft_s=0.0, verify_s=0.0, raw_expected=0.0)
    while active := [i for i in ids if len(outputs[i]) < max_tokens and outputs[i][-1] not in eos]:
        ks = [min(k, max_tokens - len(outputs[i]) - 1) for i in active]
        drafts, parents = [[] for _ in active], None
        if drafter is not None and any(ks):
            proposal = drafter.propose(active, [len(committed[i]) for i in active], [committed[i][sent[i] :] for i in active], ks)
            sent.update((i, len(committed[i])) for i in active)
            drafts = proposal.drafts
            parents = [p or None for p in proposal.parents]
            totals["draft_forwards"] += proposal.proposal.num_forwards
            totals["draft_s"] += proposal.proposal.forward_s
            totals["raw_expected"] += sum(sum(path_probs(p, q)) for p, q in zip(proposal.parents, proposal.token_probs) if p)
        outcome = verifier.verify(active, drafts, parents=parents)
        totals["steps"] += 1
        totals["verify_s"] += outcome.step.forward_s
        for i, draft, accepted, emitted in zip(active, drafts, outcome.accepted, outcome.emitted):
            totals["request_steps"] += 1
            totals["proposed"] += len(draft)
            totals["accepted"] += accepted
            outputs[i] += emitted
            committed[i] += emitted
    verifier.release(ids)
    if drafter is not None:
        drafter.release(ids)
    return {"outputs": [outputs[i] for i in ids], **totals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--prompts", type=int, default=3, help="prompts per shipped set (chat, copy)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--branching", type=int, default=4)
    parser.add_argument("--out", default="bench/results/tree_vs_chain.json")
    args = parser.parse_args()

    paths = embedded_paths()
    model = load_causal_lm(paths.target)
    verifier = VerifierEngine(BatchedRunner(model, max_sequences=16, max_context=2048), model.config.vocab_size)
    eos = set(eos_ids_of(model))
    encoder = PromptEncoder(AutoTokenizer.from_pretrained(paths.target))
    drafters = {
        "chain": DrafterEngine(DraftModelDrafter(str(paths.draft), max_sequences=16)),
        "tree": DrafterEngine(TreeDrafter(str(paths.draft), max_sequences=16, branching=args.branching)),
    }
    rows = []
    print(f"{'workload':>8} {'k':>2} {'method':>6} {'accepted/step':>13} {'tokens/step':>11} {'draft fwd/step':>14} {'raw predicted/step':>18}")
    for workload in ("chat", "copy"):
        prompts = [encoder.messages([{"role": r, "content": c} for r, c in p.messages]) for p in load_prompts(workload)[: args.prompts]]
        plain = decode(verifier, None, prompts, 0, args.max_tokens, eos)
        for k in args.budgets:
            for method, drafter in drafters.items():
                started = time.perf_counter()
                run = decode(verifier, drafter, prompts, k, args.max_tokens, eos)
                wall = time.perf_counter() - started
                if run["outputs"] != plain["outputs"]:
                    raise SystemExit(f"{workload} k={k} {method}: output differs from plain greedy decoding")
                steps = run["request_steps"]
                row = dict(
                    workload=workload, k=k, method=method, request_steps=steps, verify_steps=run["steps"], proposed=run["proposed"],
                    accepted=run["accepted"], accepted_per_step=run["accepted"] / steps, tokens_per_step=(run["accepted"] + steps) / steps,
                    draft_forwards_per_step=run["draft_forwards"] / run["steps"], draft_s=run["draft_s"], verify_s=run["verify_s"], wall_s=wall,
                    raw_predicted_per_step=run["raw_expected"] / steps if method == "tree" else None,
                )
                rows.append(row)
                raw = f"{row['raw_predicted_per_step']:.3f}" if method == "tree" else "-"
                print(f"{workload:>8} {k:>2} {method:>6} {row['accepted_per_step']:>13.3f} {row['tokens_per_step']:>11.3f} "
                      f"{row['draft_forwards_per_step']:>14.2f} {raw:>18}", flush=True)
    meta = dict(target="SmolLM2-135M-Instruct", draft="its first 4 layers (embedded)", dtype="float32", device="cpu", torch=torch.__version__,
                threads=torch.get_num_threads(), machine=platform.machine(), prompts_per_workload=args.prompts, max_tokens=args.max_tokens,
                branching=args.branching, budgets=args.budgets)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
