"""`dspark.v1.Generation` over grpc.aio, mapped onto the router's request loop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from dspark.spec.logits import TokenLogprob
from dspark.v1 import generation_pb2 as pb
from dspark.v1 import generation_pb2_grpc as pb_grpc
from services.router.errors import RouterError
from services.router.loop import Router, StepEvent
from services.router.resume import Continuity
from services.router.security import EdgeSecurity
from services.router.validate import Limits, RequestSpec, encode_prompt, make_spec
from services.security.auth import current_key_name

FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
          "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_CANCELLED,
          "error": pb.FINISH_REASON_ERROR}


def to_response(ev: StepEvent, token_text: Callable[[int], str] = str) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=ev.request_id, token_ids=ev.token_ids, text=ev.text,
                              offset=ev.offset, finish_reason=FINISH[ev.finish_reason],
                              logprobs=[_logprob(lp, token_text) for lp in ev.logprobs or ()])
    if ev.drafted or ev.verify_tokens:
        msg.step.CopyFrom(pb.SpecStats(
            drafted=ev.drafted, accepted=ev.accepted, verify_tokens=ev.verify_tokens,
            accepted_per_position=[1] * ev.accepted + [0] * (ev.drafted - ev.accepted)))
    if ev.finish_reason:
        msg.usage.CopyFrom(pb.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens,
                                    num_target_forwards=ev.num_target_forwards,
                                    mean_accepted_length=ev.mean_accepted_length))
    return msg


def _logprob(lp: TokenLogprob, token_text: Callable[[int], str]) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, token=token_text(lp.token_id),
                           top_logprobs=[pb.TopLogprob(token_id=t, logprob=v, token=token_text(t))
                                         for t, v in lp.top])


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, router: Router, limits: Limits, methods: list[str], edge: EdgeSecurity,
                 continuity: Continuity) -> None:
        self.router, self.limits, self.methods = router, limits, methods
        self.edge, self.continuity = edge, continuity

    def _spec(self, request: pb.GenerateRequest) -> RequestSpec:
        req = self.edge.check_grpc(request, self.limits)  # every field, before tokenizing
        prompt = encode_prompt(self.router.tokenizer, req)
        return make_spec(self.limits, req, prompt, request.request_id, current_key_name.get() or "")

    def _token_text(self, token_id: int) -> str:
        return self.router.tokenizer.decode([token_id])

    async def Generate(self, request: pb.GenerateRequest,  # noqa: N802 - gRPC's naming
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        try:
            try:
                spec = self._spec(request)
            except RouterError as e:  # rejected before the request loop (which counts its own)
                self.router.metrics.observe_error(e.code)
                raise
            async for msg in _relay(self.router.generate(spec), self._token_text):
                yield msg
        except RouterError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)

    async def Resume(self, request: pb.ResumeRequest,  # noqa: N802
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        """Stream the token log from `offset`, following it until the request ends; if
        the request's router died, continue generating it here (see services.router.resume).
        Text is Generate's (same stop strings, special tokens skipped); log-probs are not kept."""
        try:
            async for msg in _relay(self.continuity.resume(request.request_id, request.offset,
                                                           current_key_name.get() or "")):
                msg.ClearField("logprobs")
                yield msg
        except RouterError as e:
            await context.abort(getattr(grpc.StatusCode, e.code), e.message)

    async def ListModels(self, request: pb.ListModelsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        """Exactly what this fleet serves: its model and the one method it runs."""
        return pb.ListModelsResponse(models=[pb.ModelInfo(id=self.limits.model, methods=self.methods,
                                                          max_context=self.limits.max_context)])


async def _relay(stream: AsyncIterator, token_text: Callable[[int], str] = str
                 ) -> AsyncIterator[pb.GenerateResponse]:
    """Router events -> protobuf messages; the event stream is always closed (a cancelled
    client must still free worker state)."""
    try:
        async for ev in stream:
            yield to_response(ev, token_text)
    finally:
        await stream.aclose()
