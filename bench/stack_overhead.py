"""The microservice tax at batch 1: smartspec without speculation, through the whole stack, against an
in-process transformers generate() on the same model, prompts and host, paired; and where each step's
time goes.

    taskset -c 0 python bench/stack_overhead.py [--pairs 9] [--max-tokens 64] [--out bench/results/stack_overhead.json]

A pair is one prompt generated both ways back to back (which goes first alternates); its ratio is the
stack's tokens/s over generate()'s, reported as a geometric mean over pairs with a 95% t-interval.
Outputs must be identical (greedy, the lossless contract). The client's time is a request's wall time
in this process (the Python client's call; process start-up is not counted).

The stack runs with its metrics endpoint on, and the router's histograms (scraped before and after
each request) split the stack's time per decoding step:

- forward: the verifier's model forward;
- verifier handler: the rest of the verifier's handler (unpacking, the hand-off to the model thread and
  back, acceptance, bookkeeping);
- RPC hop: the router-seen Verify call minus the handler (serialisation, gRPC transport, both event loops);
- router step: the rest of the router's step (the policy, the controller, building the message);
- first token: the router's time to first token (admission and the prompt's prefill, from the moment the
  prompt is tokenized), per step;
- between steps: the rest of the client's wall time per step (the client's call, tokenization, the
  router's loop between steps, the reply).

Beside them, generate()'s time per token, and its first token (a max_new_tokens=1 call) per token.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the client and the stack come from this checkout

from bench.single_stream import PROMPTS  # noqa: E402
from smartspec.bench.checkout import commit_of, up_from  # noqa: E402
from smartspec.bench.metrics import paired_ratio  # noqa: E402
from smartspec.serving import free_port  # noqa: E402

SPLIT = {  # histogram -> its sum's share of the step
    "step": "smartspec_router_step_duration_seconds",
    "verify_rpc": "smartspec_router_verify_rpc_duration_seconds",
    "handler": "smartspec_verifier_handler_duration_seconds",
    "forward": "smartspec_verifier_forward_duration_seconds",
    "ttft": "smartspec_router_time_to_first_token_seconds",
}
PARTS = ("forward", "verifier handler", "RPC hop", "router step", "first token", "between steps")


def scrape(url: str) -> dict[str, float]:
    """The split histograms' sums and counts from the router's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    wanted = {f"{name}_{suffix}" for name in SPLIT.values() for suffix in ("sum", "count")}
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name in wanted}


def per_step(before: dict[str, float], after: dict[str, float], wall_s: float) -> dict[str, float]:
    """One request's mean seconds per decoding step in each part (PARTS), from two scrapes around it."""
    delta = {key: after[f"{name}_sum"] - before[f"{name}_sum"] for key, name in SPLIT.items()}
    steps = after[f"{SPLIT['step']}_count"] - before[f"{SPLIT['step']}_count"]
    mean = {key: value / steps for key, value in delta.items()}
    return {
        "forward": mean["forward"],
        "verifier handler": mean["handler"] - mean["forward"],
        "RPC hop": mean["verify_rpc"] - mean["handler"],
        "router step": mean["step"] - mean["verify_rpc"],
        "first token": mean["ttft"],
        "between steps": wall_s / steps - mean["step"] - mean["ttft"],
        "steps": steps,
    }


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smartspec.client import Client
    from smartspec.models import embedded_paths

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=9, help="pairs per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "bench/results/stack_overhead.json"))
    args = parser.parse_args()

    paths = embedded_paths()
    tokenizer = AutoTokenizer.from_pretrained(paths.target)
    target = AutoModelForCausalLM.from_pretrained(paths.target, dtype=torch.float32).eval()
    metrics_port = free_port()
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    rows = []
    with up_from(ROOT, ["--metrics-port", str(metrics_port)]) as (router, _):
        client = Client(router, timeout_s=600)
        for name, prompt in PROMPTS.items():  # warm both paths
            messages = [{"role": "user", "content": prompt}]
            client.generate(messages=messages, max_tokens=4, drafter="none", policy="none")
        for pair in range(args.pairs):
            for name, prompt in PROMPTS.items():
                messages = [{"role": "user", "content": prompt}]
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
                ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
                row = {"pair": pair, "prompt": name}
                for side in (("generate", "stack") if pair % 2 == 0 else ("stack", "generate")):
                    if side == "generate":
                        with torch.inference_mode():
                            started = time.perf_counter()
                            out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.max_tokens)
                            wall = time.perf_counter() - started
                            started = time.perf_counter()
                            target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=1)
                            row["generate_first_s"] = time.perf_counter() - started
                        row["generate_tokens"] = out[0, ids.shape[1]:].tolist()
                        row["generate_s"] = wall
                    else:
                        before = scrape(metrics_url)
                        started = time.perf_counter()
                        done = client.generate(messages=messages, max_tokens=args.max_tokens, drafter="none", policy="none")
                        wall = time.perf_counter() - started
                        row["stack_tokens"] = list(done.token_ids)
                        row["stack_s"] = wall
                        row["split"] = per_step(before, scrape(metrics_url), wall)
                if row["stack_tokens"] != row["generate_tokens"]:
                    raise SystemExit(f"pair {pair} {name}: the stack's output differs from generate()'s")
                tokens = len(row.pop("stack_tokens"))
                row.pop("generate_tokens")
                row.update(tokens=tokens, generate_tok_s=tokens / row["generate_s"], stack_tok_s=tokens / row["stack_s"])
                row["ratio"] = row["stack_tok_s"] / row["generate_tok_s"]
                rows.append(row)
                print(f"pair {pair} {name:<5} {tokens} tok  generate {row['generate_tok_s']:5.1f} tok/s  stack {row['stack_tok_s']:5.1f} tok/s"
                      f"  ratio {row['ratio']:.3f}", flush=True)
        client.close()
    summary = summarise(rows)
    meta = dict(model="SmolLM2-135M-Instruct", device="cpu", dtype="float32", torch=torch.__version__, machine=platform.machine(),
                max_tokens=args.max_tokens, pairs=args.pairs, commit=commit_of(ROOT), command=" ".join(sys.argv))
    Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1) + "\n")
    report(summary)
    print(f"wrote {args.out}")


def summarise(rows: list[dict]) -> dict:
    """Per prompt and over all: the paired tokens/s ratio with its interval, and the mean split per step
    (ms) beside generate()'s time per token."""
    groups = {name: [r for r in rows if r["prompt"] == name] for name in dict.fromkeys(r["prompt"] for r in rows)}
    groups["all"] = rows
    summary = {}
    for name, group in groups.items():
        ratio = paired_ratio({i: r["stack_tok_s"] for i, r in enumerate(group)}, {i: r["generate_tok_s"] for i, r in enumerate(group)})
        split = {part: 1e3 * statistics.fmean(r["split"][part] for r in group) for part in PARTS}
        summary[name] = dict(
            ratio=ratio,
            generate_tok_s=statistics.median(r["generate_tok_s"] for r in group),
            stack_tok_s=statistics.median(r["stack_tok_s"] for r in group),
            generate_ms_per_token=1e3 * statistics.fmean(r["generate_s"] / r["tokens"] for r in group),
            generate_first_ms_per_token=1e3 * statistics.fmean(r["generate_first_s"] / r["tokens"] for r in group),
            stack_ms_per_step=split,
        )
    return summary


def report(summary: dict) -> None:
    print("\nstack tokens/s / generate() tokens/s (geometric mean over pairs, 95% interval), and where a step's time goes (ms)")
    print(f"{'prompt':<6} {'ratio':>6} {'interval':>15}  {'generate/token':>14} {'(first token)':>13}  " + "  ".join(f"{p:>16}" for p in PARTS))
    for name, row in summary.items():
        ratio = row["ratio"]
        interval = f"[{ratio['low']:.3f}, {ratio['high']:.3f}]" if ratio["low"] is not None else "-"
        split = "  ".join(f"{row['stack_ms_per_step'][p]:16.2f}" for p in PARTS)
        print(f"{name:<6} {ratio['ratio']:6.3f} {interval:>15}  {row['generate_ms_per_token']:14.2f} {row['generate_first_ms_per_token']:13.2f}  {split}")


if __name__ == "__main__":
    main()
