"""gRPC face of the verifier: wire messages in and out, model work on the model thread."""

from __future__ import annotations

import time

import grpc

from smartspec.errors import RequestError
from smartspec.protocol import split_ragged, step_stats
from smartspec.sampling import SamplingParams, unpack_distributions
from smartspec.serving import ModelThread, rpc_errors
from smartspec.wire import common_pb2, verifier_pb2, verifier_pb2_grpc
from verifier_svc.engine import VerifierEngine

SERVICE_NAME = verifier_pb2.DESCRIPTOR.services_by_name["VerifierService"].full_name


class VerifierServicer(verifier_pb2_grpc.VerifierServiceServicer):
    def __init__(self, engine: VerifierEngine, model_info: common_pb2.ModelInfo, thread: ModelThread | None = None) -> None:
        self.engine = engine
        self.model_info = model_info
        self.thread = thread or ModelThread("verifier-model")  # the thread that loaded the model, if given

    @rpc_errors
    async def Prefill(self, request: verifier_pb2.PrefillRequest, context: grpc.aio.ServicerContext) -> verifier_pb2.PrefillResponse:
        started = time.perf_counter()
        items = [(item.request_id, list(item.token_ids), SamplingParams.from_wire(item.sampling)) for item in request.items]
        if request.chunked:
            await self.thread.run(self.engine.admit, items)
            return verifier_pb2.PrefillResponse(stats=step_stats(started, 0.0, len(items), 0, 0, 0))
        next_tokens, step = await self.thread.run(self.engine.prefill, items)
        return verifier_pb2.PrefillResponse(next_token_ids=next_tokens, stats=step_stats(started, step.forward_s, len(items), step.new_tokens, step.context_tokens, step.num_forwards))

    @rpc_errors
    async def Verify(self, request: verifier_pb2.VerifyRequest, context: grpc.aio.ServicerContext) -> verifier_pb2.VerifyResponse:
        started = time.perf_counter()
        ids = list(request.request_ids)
        if len(request.draft_counts) != len(ids):
            raise RequestError("INVALID_ARGUMENT", f"{len(ids)} request ids but {len(request.draft_counts)} draft counts")
        drafts = split_ragged(list(request.draft_token_ids), list(request.draft_counts), "draft_token_ids")
        dists = unpack_distributions(request.draft_distributions, list(request.draft_counts))
        parents = None
        if request.draft_parents:
            if len(request.draft_parents) != len(request.draft_token_ids):
                raise RequestError(
                    "INVALID_ARGUMENT",
                    f"draft_parents has {len(request.draft_parents)} entries; it needs one per draft token ({len(request.draft_token_ids)}) or none",
                )
            parents = split_ragged(list(request.draft_parents), list(request.draft_counts), "draft_parents")
        if len(request.prefill_counts) != len(request.prefill_request_ids):
            raise RequestError(
                "INVALID_ARGUMENT", f"{len(request.prefill_request_ids)} prefill request ids but {len(request.prefill_counts)} prefill counts"
            )
        prefill = list(zip(request.prefill_request_ids, request.prefill_counts))
        outcome = await self.thread.run(self.engine.verify, ids, drafts, dists, parents, prefill, request.cut_invalid_drafts)
        step = outcome.step
        return verifier_pb2.VerifyResponse(
            accepted_counts=outcome.accepted,
            emitted_token_ids=[token for tokens in outcome.emitted for token in tokens],
            committed_lengths=outcome.committed_lengths,
            stats=step_stats(started, step.forward_s, len(ids) + len(prefill), step.new_tokens, step.context_tokens, step.num_forwards),
            prefill_next_token_ids=outcome.first_tokens,
            verified_draft_counts=outcome.verified_counts,
        )

    @rpc_errors
    async def Release(self, request: verifier_pb2.ReleaseRequest, context: grpc.aio.ServicerContext) -> verifier_pb2.ReleaseResponse:
        released = await self.thread.run(self.engine.release, list(request.request_ids))
        return verifier_pb2.ReleaseResponse(released=released)

    @rpc_errors
    async def Info(self, request: verifier_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> verifier_pb2.InfoResponse:
        runner = self.engine.runner

        def snapshot() -> tuple[int, int]:
            return runner.used_tokens, runner.live

        used, live = await self.thread.run(snapshot)
        return verifier_pb2.InfoResponse(
            model=self.model_info,
            kv_capacity_tokens=runner.capacity_tokens,
            kv_used_tokens=used,
            live_sequences=live,
            max_sequences=runner.max_sequences,
        )
