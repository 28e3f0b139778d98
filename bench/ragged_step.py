"""What a ragged step costs through the verifier's public RPCs: does one request's speculation cost only
its own tokens, and does a long prompt cost only its own prefill?

    python bench/ragged_step.py [--repeats 15] [--out bench/results/ragged_step.json]

Starts `smartspec serve verifier` on the embedded target (SmolLM2-135M-Instruct, float32) as its own
process and talks to it over loopback gRPC, as the router does.

1. Verify, 16 live requests with 128-token contexts; three step shapes, interleaved per repeat:
   all at k = 0 (base), one at k = 7 beside 15 at k = 0 (one), all at k = 7 (all).
   Figure: (one - base) / (all - base), the extra time of one speculating request as a share of
   everyone speculating; a padded engine pays ~1 (every row padded to 8 tokens), a ragged one ~1/16
   plus the jump from single-token rows to a multi-token row. Reported for the verifier's own
   `stats.forward_s` and for the RPC time the client measures.
2. Prefill of one 1,000-token prompt together with ten 100-token prompts, against the 1,000-token
   prompt alone plus the ten short prompts batched alone (figure: together / (long + short)).

Medians over the repeats, with a bootstrap 95% interval of each ratio (resampling repeats).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

from smartspec.bench.microbench import bootstrap_ratio
from smartspec.bench.verifier_process import VerifierProcess
from smartspec.wire import verifier_pb2

VOCAB = 49152


def verify_shapes(stub, repeats: int, rng: random.Random) -> dict:
    ids = [f"v{i}" for i in range(16)]
    stub.Prefill(verifier_pb2.PrefillRequest(items=[verifier_pb2.PrefillItem(request_id=i, token_ids=[rng.randrange(3, VOCAB) for _ in range(128)]) for i in ids]))
    shapes = {"base": [0] * 16, "one": [7] + [0] * 15, "all": [7] * 16}
    forward: dict[str, list[float]] = {s: [] for s in shapes}
    rpc: dict[str, list[float]] = {s: [] for s in shapes}
    for n in range(repeats + 2):
        for shape, ks in shapes.items():
            drafts = [rng.randrange(3, VOCAB) for _ in range(sum(ks))]  # random drafts: all rejected, so contexts grow by one
            started = time.perf_counter()
            reply = stub.Verify(verifier_pb2.VerifyRequest(request_ids=ids, draft_counts=ks, draft_token_ids=drafts))
            elapsed = time.perf_counter() - started
            if n >= 2:  # warm-up
                forward[shape].append(reply.stats.forward_s)
                rpc[shape].append(elapsed)
    stub.Release(verifier_pb2.ReleaseRequest(request_ids=ids))
    result = {}
    for name, times in (("forward", forward), ("rpc", rpc)):
        one = [o - b for o, b in zip(times["one"], times["base"])]
        full = [a - b for a, b in zip(times["all"], times["base"])]
        low, high = bootstrap_ratio(one, full, rng)
        result[name] = dict(
            median_ms={s: 1e3 * statistics.median(t) for s, t in times.items()},
            extra_ratio=statistics.median(one) / statistics.median(full), interval=[low, high],
        )
    return result


def prefill_shapes(stub, repeats: int, rng: random.Random) -> dict:
    def prefill(lengths: list[int], tag: str) -> float:
        items = [verifier_pb2.PrefillItem(request_id=f"{tag}{i}", token_ids=[rng.randrange(3, VOCAB) for _ in range(n)]) for i, n in enumerate(lengths)]
        started = time.perf_counter()
        stub.Prefill(verifier_pb2.PrefillRequest(items=items))
        elapsed = time.perf_counter() - started
        stub.Release(verifier_pb2.ReleaseRequest(request_ids=[item.request_id for item in items]))
        return elapsed

    times: dict[str, list[float]] = {"long": [], "short": [], "together": []}
    for n in range(repeats + 1):
        sample = {"long": prefill([1000], "l"), "short": prefill([100] * 10, "s"), "together": prefill([1000] + [100] * 10, "t")}
        if n >= 1:
            for shape, seconds in sample.items():
                times[shape].append(seconds)
    apart = [a + b for a, b in zip(times["long"], times["short"])]
    low, high = bootstrap_ratio(times["together"], apart, rng)
    return dict(
        median_ms={s: 1e3 * statistics.median(t) for s, t in times.items()},
        together_over_apart=statistics.median(times["together"]) / statistics.median(apart), interval=[low, high],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="bench/results/ragged_step.json")
    parser.add_argument("--verifier-flag", action="append", default=[], help="extra flag for the verifier (repeatable)")
    args = parser.parse_args()
    with VerifierProcess(["--max-sequences", "32", *args.verifier_flag]) as verifier:
        rng = random.Random(0)
        verify = verify_shapes(verifier.stub, args.repeats, rng)
        prefill = prefill_shapes(verifier.stub, args.repeats, rng)
        info = verifier.info
    for name in ("forward", "rpc"):
        v = verify[name]
        print(f"verify {name:>7}: base {v['median_ms']['base']:.1f} ms, one k=7 {v['median_ms']['one']:.1f} ms, all k=7 "
              f"{v['median_ms']['all']:.1f} ms; extra(one)/extra(all) = {v['extra_ratio']:.3f} [{v['interval'][0]:.3f}, {v['interval'][1]:.3f}]")
    print(f"prefill: 1000 alone {prefill['median_ms']['long']:.1f} ms, ten 100 {prefill['median_ms']['short']:.1f} ms, together "
          f"{prefill['median_ms']['together']:.1f} ms; together/(sum) = {prefill['together_over_apart']:.3f} "
          f"[{prefill['interval'][0]:.3f}, {prefill['interval'][1]:.3f}]")
    meta = dict(model=Path(info.model.model).name, device_name=info.model.device_name, dtype=info.model.dtype, repeats=args.repeats,
                machine=platform.machine(), verifier_flags=args.verifier_flag)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "verify": verify, "prefill": prefill}, indent=2) + "\n")


if __name__ == "__main__":
    main()
