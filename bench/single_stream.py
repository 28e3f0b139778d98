"""Single-stream speed: smartspec (one request at a time through the whole stack) next to transformers'
own generate(), plain and assisted (assistant_model=, prompt_lookup_num_tokens=), on the same models
and prompts, in one run.

    python bench/single_stream.py [--router HOST:PORT] [--max-tokens 64] [--out bench/results/single_stream.json]

Without --router it starts `smartspec up` itself. Outputs are checked to be identical to plain greedy
generate() (the lossless contract), and tokens/s is generated tokens / wall time per request.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = {
    "copy": "Repeat the following text exactly, word for word:\n\nOur team meets every Monday at ten to review the previous "
    "week and plan the next one. Please bring a short update on your work, any blockers you have, and one thing you learned.",
    "code": "Rewrite this Python function with type hints:\n\ndef average(values):\n    total = 0\n    for value in values:\n"
    "        total += value\n    return total / len(values)\n",
    "chat": "Explain what a hash table is to a beginner programmer.",
}
SMARTSPEC = [("none", "none"), ("prompt_lookup", "fixed:3"), ("prompt_lookup", "fixed:5"), ("draft_model", "fixed:1"),
             ("draft_model", "fixed:3"), ("auto", "goodput")]


def start_stack() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "smartspec.cli", "up", "--port", "0"], stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    for line in process.stdout:
        if line.startswith("ready "):
            return process, dict(p.split("=", 1) for p in line.split()[1:])["router"]
    raise RuntimeError("smartspec up exited before it was ready")


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smartspec.client import Client
    from smartspec.models import embedded_paths

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--router", default="")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="bench/results/single_stream.json")
    args = parser.parse_args()

    paths = embedded_paths()
    tokenizer = AutoTokenizer.from_pretrained(paths.target)
    target = AutoModelForCausalLM.from_pretrained(paths.target, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(paths.draft, dtype=torch.float32).eval()
    process, router = (None, args.router) if args.router else start_stack()
    rows = []
    try:
        client = Client(router, timeout_s=600)
        for name, prompt in PROMPTS.items():
            messages = [{"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
            ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
            hf_variants = {
                "transformers generate": {},
                "transformers assisted (draft model)": {"assistant_model": draft},
                "transformers prompt lookup (3)": {"prompt_lookup_num_tokens": 3},
            }
            reference = None
            for label, extra in hf_variants.items():
                times = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    out = target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=args.max_tokens, **extra)
                    times.append(time.perf_counter() - started)
                tokens = out[0, ids.shape[1]:].tolist()
                reference = reference or tokens
                rows.append(dict(prompt=name, system=label, tokens=len(tokens), tok_s=len(tokens) / statistics.median(times), same_as_greedy=tokens == reference))
            for drafter, policy in SMARTSPEC:
                times = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    done = client.generate(messages=messages, max_tokens=args.max_tokens, drafter=drafter, policy=policy)
                    times.append(time.perf_counter() - started)
                rows.append(dict(prompt=name, system=f"smartspec {drafter} {policy}", tokens=len(done.token_ids),
                                 tok_s=len(done.token_ids) / statistics.median(times), same_as_greedy=done.token_ids == reference,
                                 accepted=done.stats["accepted"], proposed=done.stats["proposed"]))
            for row in rows[-(len(hf_variants) + len(SMARTSPEC)):]:
                extra = f"  {row['accepted']}/{row['proposed']} accepted" if "accepted" in row else ""
                print(f"{row['prompt']:<5} {row['system']:<40} {row['tokens']:>3} tok {row['tok_s']:6.1f} tok/s  same={row['same_as_greedy']}{extra}", flush=True)
        client.close()
    finally:
        if process is not None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
    meta = dict(model="SmolLM2-135M-Instruct (draft: its first 4 layers)", device="cpu", dtype="float32", torch=torch.__version__,
                machine=platform.machine(), max_tokens=args.max_tokens, repeats=args.repeats)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
