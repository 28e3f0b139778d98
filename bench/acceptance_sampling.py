"""Acceptance and sampling of one Verify step: the per-request code against the batched pass, in time
and in reads of tensor values back to the host.

    python bench/acceptance_sampling.py [--repeats 15] [--batch 32] [--k 8] [--note TEXT]
                                        [--out bench/results/acceptance_sampling.json]

Both run in this process, on one thread, on the same inputs, interleaved per repeat (their order
alternating), after one warm-up:

- old: the per-request decision of verifier_svc/engine.py as of commit 015dbbd, with that commit's
  verifier_svc/acceptance.py, smartspec/runtime/sampler.py and smartspec/sampling.py, read from git into
  temporary modules;
- new: ``verifier_svc.acceptance.decide`` over the step's flat logits.

Inputs: the embedded target's logits (SmolLM2-135M-Instruct, vocabulary 49,152) at batch x (k + 1)
positions of a real text, and at the same positions drafts of the embedded draft model: its argmax for
greedy requests; for sampling ones a draw from its processed top 64 (what the draft_model drafter
sends). Every request proposes k drafts; both codes' outputs are checked equal.

Host reads (``smartspec.bench.microbench``) are counted per step: on an accelerator each is a
device-to-host transfer and a sync. For new, as timed (on the host, the top-p nucleus reads its candidate
counts from host memory: no transfer) and on the accelerator's code path (a sorted nucleus).
Figures: medians over the repeats, and a bootstrap 95% interval of old / new.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from smartspec.bench.microbench import bootstrap_ratio, counting_host_reads
from smartspec.runtime import sampler
from smartspec.runtime.sampler import draft_distribution
from smartspec.sampling import DRAFT, GREEDY, SamplingParams, uniform
from smartspec.tree import chain_parents
from verifier_svc.acceptance import Proposal, decide

OLD_COMMIT = "015dbbd"
# Old modules in import order: each sees the old versions of those before it.
OLD_MODULES = {
    "smartspec.sampling": "smartspec/sampling.py",
    "smartspec.runtime.sampler": "smartspec/runtime/sampler.py",
    "verifier_svc.acceptance": "verifier_svc/acceptance.py",
    "verifier_svc.engine": "verifier_svc/engine.py",
}
CONFIGS = {
    "sampling T=0.8 top-p=0.95": SamplingParams(0.8, top_p=0.95),
    "sampling T=0.8 top-k=50 top-p=0.95": SamplingParams(0.8, top_p=0.95, top_k=50),
    "sampling T=1": SamplingParams(1.0),
    "greedy": GREEDY,
}
TEXT_FILES = ("README.md", "docs/design.md")


def old_engine(commit: str) -> types.ModuleType:
    """verifier_svc/engine.py as of `commit`, importing that commit's acceptance, sampler and sampling."""
    root = Path(__file__).resolve().parent.parent
    for name in OLD_MODULES:  # the current ones first, so that their packages are there to restore
        importlib.import_module(name)
    current = {name: sys.modules[name] for name in OLD_MODULES}
    try:
        for name, path in OLD_MODULES.items():
            source = subprocess.run(["git", "-C", str(root), "show", f"{commit}:{path}"], check=True, capture_output=True, text=True).stdout
            module = types.ModuleType(name)
            _install(name, module)  # `import name` and `from package import name` find the old one
            exec(compile(source, f"{commit}:{path}", "exec"), module.__dict__)
    finally:
        for name, restored in current.items():
            _install(name, restored)
    return module


def _install(name: str, module: types.ModuleType) -> None:
    package, _, attribute = name.rpartition(".")
    sys.modules[name] = module
    setattr(sys.modules[package], attribute, module)


def model_logits(positions: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The embedded target's and draft's logits ([positions, vocab] each) over a real text, and the
    target's name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smartspec.models import embedded_paths

    paths = embedded_paths()
    root = Path(__file__).resolve().parent.parent
    ids = AutoTokenizer.from_pretrained(paths.target)("\n".join((root / f).read_text() for f in TEXT_FILES)).input_ids[:positions]
    out = []
    for path in (paths.target, paths.draft):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.inference_mode():
            out.append(model(torch.tensor([ids])).logits[0].clone())
    return out[0], out[1], paths.target.name


def proposals(draft: torch.Tensor, params: SamplingParams, batch: int, k: int) -> list[Proposal]:
    """Per request b, rows b (k + 1) .. b (k + 1) + k, and k drafts of the draft model at those rows."""
    out = []
    for b in range(batch):
        row, seed, first = b * (k + 1), 1000 + b, 100 + b
        request = SamplingParams(params.temperature, params.top_p, params.top_k, seed)
        if request.greedy:
            tokens, dists = draft[row : row + k].argmax(dim=-1).tolist(), [None] * k
        else:
            dists = [draft_distribution(draft[row + i], request, 64) for i in range(k)]
            tokens = [d.sample(uniform(seed, first + i, DRAFT)) for i, d in enumerate(dists)]
        out.append(Proposal(row, tokens, chain_parents(k), dists, request, first))
    return out


@dataclass
class Case:
    """The old and the new code on one step's inputs."""

    old: Callable[[], list[tuple[int, int]]]
    new: Callable[[], list[tuple[int, int]]]


def case(engine: types.ModuleType, logits: torch.Tensor, batch: list[Proposal]) -> Case:
    """The two codes on one step, each returning (accepted, token) per request."""

    def old() -> list[tuple[int, int]]:
        decisions = [
            engine.VerifierEngine._accept(p.sampling, list(p.tokens), list(p.parents), p.dists, logits[p.row : p.end], p.first_index)
            for p in batch
        ]
        return [(len(path), token) for path, token in decisions]

    def new() -> list[tuple[int, int]]:
        return [(len(d.path), d.token) for d in decide(logits, batch)]

    return Case(old, new)


def reads(run: Callable[[], object]) -> int:
    with counting_host_reads() as counts:
        run()
    return counts["reads"]


def device_path_reads(run: Callable[[], object]) -> int:
    """Host reads of `run` with the accelerator's code path (no host memory shortcuts)."""
    host = sampler.HOST_DEVICES
    sampler.HOST_DEVICES = frozenset()
    try:
        return reads(run)
    finally:
        sampler.HOST_DEVICES = host


def timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--note", default="", help="measurement conditions, saved with the results")
    parser.add_argument("--out", default="bench/results/acceptance_sampling.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = old_engine(OLD_COMMIT)
    target, draft, model = model_logits(args.batch * (args.k + 1))
    cases = {name: case(engine, target, proposals(draft, params, args.batch, args.k)) for name, params in CONFIGS.items()}
    results = {}
    for name, c in cases.items():
        outputs = c.new()
        assert outputs == c.old(), f"{name}: the batched pass changed an output"
        results[name] = dict(
            outputs_equal=True,
            mean_accepted=statistics.mean(n for n, _ in outputs),
            old_host_reads=reads(c.old),
            new_host_reads=reads(c.new),
            new_device_transfers=device_path_reads(c.new),
        )
    times: dict[str, dict[str, list[float]]] = {name: {"old": [], "new": []} for name in cases}
    for repeat in range(args.repeats + 1):
        for name, c in cases.items():
            order = ("old", "new") if repeat % 2 else ("new", "old")
            sample = {which: timed(getattr(c, which)) for which in order}
            if repeat:  # the first is a warm-up
                for which, seconds in sample.items():
                    times[name][which].append(seconds)
    rng = random.Random(0)
    print(f"batch {args.batch}, k = {args.k}, vocabulary {target.shape[1]}; medians of {args.repeats}; reads per step (old / new / new on an accelerator)")
    for name, t in times.items():
        low, high = bootstrap_ratio(t["old"], t["new"], rng)
        r = results[name]
        r.update(old_ms=1e3 * statistics.median(t["old"]), new_ms=1e3 * statistics.median(t["new"]),
                 interval=[low, high], old_ms_all=[1e3 * s for s in t["old"]], new_ms_all=[1e3 * s for s in t["new"]])
        r["ratio"] = r["old_ms"] / r["new_ms"]
        print(f"{name:>36}: old {r['old_ms']:8.1f} ms  new {r['new_ms']:7.1f} ms  old/new {r['ratio']:5.2f} [{low:.2f}, {high:.2f}]  "
              f"reads {r['old_host_reads']} / {r['new_host_reads']} / {r['new_device_transfers']}  accepted {r['mean_accepted']:.2f}")
    meta = dict(model=model, vocab=target.shape[1], batch=args.batch, k=args.k, repeats=args.repeats, old_commit=OLD_COMMIT,
                torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(), processor=_processor(),
                cpu_affinity=sorted(os.sched_getaffinity(0)), note=args.note)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


def _processor() -> str:
    """The CPU's model name."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
