"""gRPC face of the drafter: wire messages in and out, engine work on the model thread."""

from __future__ import annotations

import time

import grpc

from drafter_svc.engine import DrafterEngine
from smartspec.protocol import split_ragged, step_stats
from smartspec.sampling import SamplingParams, pack_distributions
from smartspec.serving import ModelThread, rpc_errors
from smartspec.wire import drafter_pb2, drafter_pb2_grpc

SERVICE_NAME = drafter_pb2.DESCRIPTOR.services_by_name["DrafterService"].full_name

_OK = drafter_pb2.PROPOSE_STATUS_OK
_RESYNC = drafter_pb2.PROPOSE_STATUS_RESYNC_REQUIRED


class DrafterServicer(drafter_pb2_grpc.DrafterServiceServicer):
    def __init__(self, engine: DrafterEngine, thread: ModelThread | None = None) -> None:
        self.engine = engine
        self.thread = thread or ModelThread(f"drafter-{engine.drafter.kind}")  # the thread that built the drafter, if given

    @rpc_errors
    async def Propose(self, request: drafter_pb2.ProposeRequest, context: grpc.aio.ServicerContext) -> drafter_pb2.ProposeResponse:
        started = time.perf_counter()
        ids = list(request.request_ids)
        appended = split_ragged(list(request.appended_token_ids), list(request.appended_counts), "appended_token_ids")
        sampling = [SamplingParams.from_wire(params) for params in request.sampling]
        outcome = await self.thread.run(
            self.engine.propose, ids, list(request.committed_lengths), appended, list(request.max_draft_tokens), sampling
        )
        work = outcome.proposal
        return drafter_pb2.ProposeResponse(
            statuses=[_OK if ok else _RESYNC for ok in outcome.in_sync],
            draft_counts=[len(draft) for draft in outcome.drafts],
            draft_token_ids=[token for draft in outcome.drafts for token in draft],
            draft_distributions=pack_distributions(outcome.distributions),
            draft_parents=[parent for parents in outcome.parents for parent in parents],
            draft_token_probs=[prob for probs in outcome.token_probs for prob in probs],
            stats=step_stats(started, work.forward_s, len(ids), work.new_tokens, work.context_tokens, work.num_forwards),
        )

    @rpc_errors
    async def Release(self, request: drafter_pb2.ReleaseRequest, context: grpc.aio.ServicerContext) -> drafter_pb2.ReleaseResponse:
        released = await self.thread.run(self.engine.release, list(request.request_ids))
        return drafter_pb2.ReleaseResponse(released=released)

    @rpc_errors
    async def Info(self, request: drafter_pb2.InfoRequest, context: grpc.aio.ServicerContext) -> drafter_pb2.InfoResponse:
        live = await self.thread.run(lambda: self.engine.live)
        return drafter_pb2.InfoResponse(kind=self.engine.drafter.kind, model=self.engine.drafter.model_info(), live_sequences=live)
