"""Per-step decision time of the goodput controller (it sits in the router's hot path).

    python bench/decision_time.py [--out bench/results/decision_time.json]

Times SpeculationController.decide (allocation + hysteresis) and allocate_goodput alone at batch sizes
up to 64 with K = 8, for one model-free drafter, one draft model, and both mixed in one batch.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from router.controller.allocator import Candidate, allocate_goodput
from router.controller.controller import Slot, SpeculationController


def median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--out", default="bench/results/decision_time.json")
    args = parser.parse_args()
    rng = random.Random(0)
    rows = []
    print(f"{'batch':>5} {'drafters':<26} {'decide us':>9} {'allocate us':>11}")
    for batch in (1, 8, 16, 32, 64):
        for mix in (("prompt_lookup",), ("draft_model",), ("prompt_lookup", "draft_model")):
            controller = SpeculationController(k_max=8)
            slots = [Slot(f"r{i}", rng.choice(mix), cap=8, context_tokens=rng.randrange(50, 1000)) for i in range(batch)]
            for s in slots:
                controller.observe_request(s.request_id, s.drafter, 8, rng.randrange(0, 9), asked=8)
            cost = controller.step_cost(slots)
            candidates = controller._candidates(slots)
            decide = median_us(lambda: controller.decide(slots), args.repeats)
            allocate = median_us(lambda: allocate_goodput(candidates, cost), args.repeats)
            rows.append(dict(batch=batch, drafters="+".join(mix), k_max=8, decide_us=decide, allocate_us=allocate))
            print(f"{batch:>5} {'+'.join(mix):<26} {decide:>9.0f} {allocate:>11.0f}", flush=True)
    Path(args.out).write_text(json.dumps({"meta": {"repeats": args.repeats, "k_max": 8}, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
