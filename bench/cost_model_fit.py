"""Does the startup profile alone predict the verifier's step times? The router's cost-profile sweep,
then held-out steps of shapes the sweep never ran, predicted by the fitted model with no online refit.

    python bench/cost_model_fit.py [--steps 90] [--out bench/results/cost_model_fit.json]
    python bench/cost_model_fit.py --refit SAVED.json     # fit a saved run's samples again

Starts `smartspec serve verifier` (embedded target, float32) as its own process. The sweep is the one
the router runs at start-up (router/controller/profile.py: uniform and mixed k per request over spread
contexts and four batch sizes, and steps that also carry a prefill chunk), timed as a whole. The held-out steps draw, per step, a batch of 1-16
requests whose contexts differ (16 to 1,500 tokens) and a k of 0-7 per request, each timed as the median
of 3 runs; every third also carries a prefill chunk (16-128 tokens) of a long prompt, as paced steps
under load do. Reported: the sweep's duration and the mean absolute percentage error of the predicted
RPC time on the held-out decoding steps and, apart, on the steps with a chunk, and the breakpoints the
fit chose (cost_model.Breakpoints), beside the same sweep fitted at fixed breakpoints (the default: a
jump once a step has two new tokens, no knee).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import time
from pathlib import Path

import grpc
import numpy as np

from router.controller.cost_model import Breakpoints, new_verify_model
from router.controller.profile import K_MAX, PrefillRow, measure, step_features
from smartspec.bench.verifier_process import VerifierProcess
from smartspec.serving import CHANNEL_OPTIONS
from smartspec.wire import verifier_pb2, verifier_pb2_grpc

VOCAB = 49152
REPEATS = 3
CHUNK_EVERY = 3  # every third held-out step also prefills a chunk
CHUNKS = (16, 48, 128)  # its sizes, drawn per step: what the pacer gives on this CPU (tens of tokens) and more
CHUNK_PROMPT = 4000
CHUNKED = "h-chunked"


async def profile(address: str, info) -> tuple[list, list[float], float]:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        started = time.perf_counter()
        rows, seconds = await measure(verifier_pb2_grpc.VerifierServiceStub(channel), info)
        return rows, seconds, time.perf_counter() - started


def held_out(stub, steps: int, rng: random.Random) -> tuple[list, list[float], list[dict]]:
    """Every CHUNK_EVERY-th step also carries a prefill chunk of a long prompt admitted chunked, as a
    paced step under load does."""
    ids = [f"h{i}" for i in range(16)]
    lengths = {i: rng.randint(16, 1500) for i in ids}
    stub.Prefill(verifier_pb2.PrefillRequest(items=[verifier_pb2.PrefillItem(request_id=i, token_ids=[rng.randrange(3, VOCAB) for _ in range(n)]) for i, n in lengths.items()]))
    prompt = [rng.randrange(3, VOCAB) for _ in range(CHUNK_PROMPT)]
    stub.Prefill(verifier_pb2.PrefillRequest(items=[verifier_pb2.PrefillItem(request_id=CHUNKED, token_ids=prompt)], chunked=True))
    cached = 0  # of the chunked prompt
    rows, seconds, shapes = [], [], []
    for n in range(steps + 2):
        batch = rng.sample(ids, rng.randint(1, 16))
        ks = [rng.randint(0, K_MAX) for _ in batch]
        contexts = [lengths[i] for i in batch]
        chunk = rng.choice(CHUNKS) if n % CHUNK_EVERY == CHUNK_EVERY - 1 and cached + REPEATS * max(CHUNKS) < CHUNK_PROMPT else 0
        chunks = [PrefillRow(cached, chunk)] if chunk else []
        times = []
        for _ in range(REPEATS):  # the median of a few runs of the shape: one step's own noise is large here
            drafts = [rng.randrange(3, VOCAB) for _ in range(sum(ks))]
            message = verifier_pb2.VerifyRequest(request_ids=batch, draft_counts=ks, draft_token_ids=drafts,
                                                 prefill_request_ids=[CHUNKED] if chunk else [], prefill_counts=[chunk] if chunk else [])
            started = time.perf_counter()
            reply = stub.Verify(message)
            times.append(time.perf_counter() - started)
            cached += chunk
            for i, accepted in zip(batch, reply.accepted_counts):
                lengths[i] += accepted + 1
        if n >= 2:
            rows.append(step_features(contexts, ks, chunks))
            seconds.append(statistics.median(times))
            shapes.append(dict(batch=len(batch), ks=ks, contexts=contexts, prefill_chunk=chunk))
    stub.Release(verifier_pb2.ReleaseRequest(request_ids=ids + [CHUNKED]))
    return rows, seconds, shapes


def mape(errors: list[float]) -> str:
    return f"MAPE {100 * statistics.mean(errors):.1f}% (median {100 * statistics.median(errors):.1f}%, worst {100 * max(errors):.1f}%)" if errors else "none"


def evaluate(rows: list, seconds: list[float], test_rows: list, test_seconds: list[float], shapes: list[dict]) -> dict[str, dict]:
    """The sweep fitted with breakpoints chosen by the fit, and at the fixed default ones; each fit's
    held-out errors, printed, and its predictions."""
    fits = {}
    for name, breaks in (("fitted breakpoints", None), ("fixed breakpoints", Breakpoints())):
        model = new_verify_model()
        model.fit_batch(rows, seconds, breaks)
        predicted = [model.predict(x) for x in test_rows]
        errors = [abs(p - s) / s for p, s in zip(predicted, test_seconds)]
        decoding = [e for e, shape in zip(errors, shapes) if not shape["prefill_chunk"]]
        chunked = [e for e, shape in zip(errors, shapes) if shape["prefill_chunk"]]
        fits[name] = dict(breakpoints=model.breaks.as_dict(), coefficients=model.as_dict(), held_out_mape=statistics.mean(decoding),
                          held_out_chunk_mape=statistics.mean(chunked) if chunked else None, predicted_s=predicted)
        print(f"{name}: {model.breaks}, coefficients {model.as_dict()}")
        print(f"  held-out decoding steps: {len(decoding)}, {mape(decoding)}")
        print(f"  held-out steps with a prefill chunk: {len(chunked)}, {mape(chunked)}")
    return fits


def saved_shape(features: list[float], before_breakpoints: bool) -> np.ndarray:
    """A saved step's shape. Runs saved before the model had breakpoints end with its jump indicator
    (some row of several tokens) where the shape now has its longest row: 1 + that indicator stands
    for it exactly, as far as the model can tell."""
    shape = np.asarray(features, dtype=float)
    if before_breakpoints:
        shape[-1] += 1
    return shape


def refit(path: Path) -> None:
    """`--refit`: the fits of a saved run's own samples, no verifier needed."""
    saved = json.loads(path.read_text())
    old = "fits" not in saved
    rows = [saved_shape(step["features"], old) for step in saved["sweep"]]
    test_rows = [saved_shape(step["features"], old) for step in saved["held_out"]]
    print(f"{path}: {len(rows)} sweep steps, {len(test_rows)} held-out steps")
    evaluate(rows, [step["measured_s"] for step in saved["sweep"]], test_rows, [step["measured_s"] for step in saved["held_out"]], saved["held_out"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=90)
    parser.add_argument("--out", default="bench/results/cost_model_fit.json")
    parser.add_argument("--refit", type=Path, help="fit a saved run's samples again (no verifier, nothing written)")
    args = parser.parse_args()
    if args.refit:
        refit(args.refit)
        return
    with VerifierProcess(["--max-sequences", "32"]) as verifier:
        rows, seconds, sweep_s = asyncio.run(profile(verifier.address, verifier.info))
        test_rows, test_seconds, shapes = held_out(verifier.stub, args.steps, random.Random(1))
        info = verifier.info
    print(f"profile sweep: {len(rows)} steps in {sweep_s:.1f} s")
    fits = evaluate(rows, seconds, test_rows, test_seconds, shapes)
    meta = dict(model=Path(info.model.model).name, device_name=info.model.device_name, dtype=info.model.dtype, machine=platform.machine())
    predictions = {name: fit.pop("predicted_s") for name, fit in fits.items()}
    result = dict(meta=meta, sweep_steps=len(rows), sweep_s=sweep_s, fits=fits,
                  held_out=[dict(shape, features=x.tolist(), measured_s=s, predicted_s={name: p[i] for name, p in predictions.items()})
                            for i, (shape, x, s) in enumerate(zip(shapes, test_rows, test_seconds))],
                  sweep=[dict(features=x.tolist(), measured_s=s) for x, s in zip(rows, seconds)])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
