"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on GRPC_PORT,
served by grpcio's asyncio server on the HTTP app's event loop, through the same engine
(its batchers, admission, decode threads and metrics).

A request the engine would refuse is refused before its inputs are read, with
UNAVAILABLE and ``grpc-retry-pushback-ms`` (gRPC's own retry hint) and ``retry-after``
in the trailing metadata. A call the client cancels, or whose deadline passes, drops its
items before they are computed, as an HTTP client's disconnect does.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from api.errors import describe
from api.metrics import GRPC_REQUESTS, GRPC_SECONDS
from serving import Engine, InputError
from serving.admission import Pacing, Refusal
from settings import Settings
from v2 import core
from v2.core import InferRequest, InferResponse, Requested
from v2.stubs import messages
from v2.tensors import Tensor, check_header, from_list, from_raw, to_raw

pb: Any = messages()
logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
# What each HTTP status of describe() is over gRPC.
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Where typed (not raw) contents keep each datatype's values.
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class Abort(Exception):
    """An error as a gRPC status, with trailing metadata."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple[Any, ...] = ()):
        super().__init__(message)
        self.code = code
        self.trailers = trailers


def as_abort(exc: BaseException) -> Abort:
    """``exc`` as the status its HTTP answer would have."""
    described = describe(exc)
    status = int(described["status"])
    trailers: tuple[Any, ...] = ()
    if status == 503:
        wait = float(getattr(exc, "retry_after", 1))
        trailers = (("grpc-retry-pushback-ms", str(round(wait * 1000))), ("retry-after", str(wait)))
    if status == 500:
        logger.error("gRPC call failed", exc_info=exc)
    code = CODES.get(status, grpc.StatusCode.INTERNAL)
    return Abort(code, str(described["detail"]), trailers)


def _parameters(parameters: Any) -> dict[str, Any]:
    return {
        name: getattr(value, value.WhichOneof("parameter_choice"))
        for name, value in parameters.items()
        if value.WhichOneof("parameter_choice") is not None
    }


def read_request(request: Any) -> InferRequest:
    """A ModelInferRequest as the protocol's request: raw contents, or typed ones."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InputError(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per input"
        )
    inputs = []
    for number, entry in enumerate(request.inputs):
        datatype, shape = check_header(entry.name, entry.datatype, list(entry.shape))
        if raw:
            data = from_raw(entry.name, datatype, shape, raw[number])
        else:
            field = CONTENTS.get(datatype)
            if field is None:
                raise InputError(f"input {entry.name!r}: send {datatype} in raw_input_contents")
            data = from_list(entry.name, datatype, shape, list(getattr(entry.contents, field)))
        inputs.append(Tensor(entry.name, datatype, shape, data))
    outputs = [Requested(o.name, _parameters(o.parameters)) for o in request.outputs]
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        id=request.id,
        inputs=inputs,
        outputs=outputs,
        parameters=_parameters(request.parameters),
    )


def write_response(response: InferResponse) -> Any:
    """The protocol's response as a ModelInferResponse, every output raw."""
    answer = pb.ModelInferResponse(
        model_name=response.model, model_version=response.version, id=response.id
    )
    for tensor in response.outputs:
        answer.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
        answer.raw_output_contents.append(to_raw(tensor.data, tensor.datatype))
    return answer


class InferenceService:
    """The methods of GRPCInferenceService, over ``engine``."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.max_rows = settings.max_queue_size
        # Requests of one stream computing at once; the stream's reads wait beyond it,
        # so a bulk client is held back by flow control, not refused.
        self.stream_window = 2 * settings.batch_size_ceiling
        self.pacing = Pacing()  # by the client's connection (its peer address)

    async def server_live(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=self.engine.liveness() is None)

    async def server_ready(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.engine.readiness() is None)

    async def model_ready(self, request: Any, context: Any) -> Any:
        service = core.find(self.engine, request.name, request.version)
        return pb.ModelReadyResponse(ready=core.model_not_ready(self.engine, service) is None)

    async def server_metadata(self, request: Any, context: Any) -> Any:
        metadata = core.server_metadata(self.engine)
        return pb.ServerMetadataResponse(
            name=metadata["name"], version=metadata["version"], extensions=metadata["extensions"]
        )

    async def model_metadata(self, request: Any, context: Any) -> Any:
        service = core.find(self.engine, request.name, request.version)
        return json_format.ParseDict(
            core.model_metadata(self.engine, service), pb.ModelMetadataResponse()
        )

    async def model_config(self, request: Any, context: Any) -> Any:
        service = core.find(self.engine, request.name, request.version)
        config = json_format.ParseDict(core.model_config(service), pb.ModelConfig())
        return pb.ModelConfigResponse(config=config)

    async def model_statistics(self, request: Any, context: Any) -> Any:
        statistics = core.statistics(self.engine, request.name, request.version)
        return json_format.ParseDict(statistics, pb.ModelStatisticsResponse())

    async def repository_index(self, request: Any, context: Any) -> Any:
        index = core.repository_index(self.engine, request.ready)
        return json_format.ParseDict({"models": index}, pb.RepositoryIndexResponse())

    async def repository_model_load(self, request: Any, context: Any) -> Any:
        parameters = dict(request.parameters)
        control = core.control(self.engine, parameters)
        await control.load(request.model_name, core.load_config(parameters))
        return pb.RepositoryModelLoadResponse()

    async def repository_model_unload(self, request: Any, context: Any) -> Any:
        await core.control(self.engine, dict(request.parameters)).unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    async def model_infer(self, request: Any, context: Any) -> Any:
        return await self._infer(request, context, paced=True)

    async def _infer(self, request: Any, context: Any, paced: bool = False) -> Any:
        """Admits, then reads and answers one request; a refusal reads nothing. A
        ``paced`` call that comes back on a refused connection before its retry hint
        waits out the rest of it first, as over HTTP (serving/admission.py)."""
        loop = asyncio.get_running_loop()
        arrived_at = loop.time()
        peer = context.peer() if paced else None
        if peer is not None and (wait := self.pacing.wait(peer, arrived_at)):
            await asyncio.sleep(wait)
        name, version = request.model_name, request.model_version
        refusal: Refusal | None = self.engine.admit(name, arrived_at, version)
        if refusal is not None:
            if peer is not None:
                now = loop.time()
                self.pacing.refused(peer, now + refusal.hold_s, now)
            raise refusal.error
        infer_request = read_request(request)
        remaining = context.time_remaining()
        if remaining is not None:
            # The call's deadline shortens the request's, as a timeout parameter does.
            given = infer_request.parameters.get(core.TIMEOUT)
            microseconds = max(1, int(remaining * 1e6))
            if not isinstance(given, int) or given > microseconds:
                infer_request.parameters[core.TIMEOUT] = microseconds
        with self.engine.lease(name, version) as service:  # answered even if unloaded meanwhile
            response = await core.infer(service, infer_request, self.max_rows)
        return write_response(response)

    async def model_stream_infer(
        self, requests: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        """Answers each request of the stream as it is computed, tagged with its id; a
        failed one is answered with its error_message and the stream goes on."""
        answers: asyncio.Queue[Any] = asyncio.Queue()
        window = asyncio.Semaphore(self.stream_window)
        running: set[asyncio.Task[None]] = set()

        counted = GRPC_REQUESTS.labels("ModelStreamInfer", "OK")

        async def answer(request: Any) -> None:
            try:
                reply = pb.ModelStreamInferResponse(
                    infer_response=await self._infer(request, context)
                )
                counted.inc()
            except Exception as exc:
                abort = exc if isinstance(exc, Abort) else as_abort(exc)
                GRPC_REQUESTS.labels("ModelStreamInfer", abort.code.name).inc()
                reply = pb.ModelStreamInferResponse(
                    error_message=f"{abort.code.name}: {abort}",
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name, id=request.id
                    ),
                )
            finally:
                window.release()
            answers.put_nowait(reply)

        async def read() -> None:
            async for request in requests:
                await window.acquire()
                task = asyncio.create_task(answer(request))
                running.add(task)
                task.add_done_callback(running.discard)
            while running:
                await asyncio.wait(set(running))
            answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (reply := await answers.get()) is not None:
                yield reply
            await reader  # its error, if reading failed
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()


METHODS: dict[str, tuple[str, str, str, bool]] = {
    # rpc: (InferenceService method, request message, response message, streaming)
    "ServerLive": ("server_live", "ServerLiveRequest", "ServerLiveResponse", False),
    "ServerReady": ("server_ready", "ServerReadyRequest", "ServerReadyResponse", False),
    "ModelReady": ("model_ready", "ModelReadyRequest", "ModelReadyResponse", False),
    "ServerMetadata": ("server_metadata", "ServerMetadataRequest", "ServerMetadataResponse", False),
    "ModelMetadata": ("model_metadata", "ModelMetadataRequest", "ModelMetadataResponse", False),
    "ModelInfer": ("model_infer", "ModelInferRequest", "ModelInferResponse", False),
    "ModelStreamInfer": (
        "model_stream_infer",
        "ModelInferRequest",
        "ModelStreamInferResponse",
        True,
    ),
    "ModelConfig": ("model_config", "ModelConfigRequest", "ModelConfigResponse", False),
    "ModelStatistics": (
        "model_statistics",
        "ModelStatisticsRequest",
        "ModelStatisticsResponse",
        False,
    ),
    "RepositoryIndex": (
        "repository_index",
        "RepositoryIndexRequest",
        "RepositoryIndexResponse",
        False,
    ),
    "RepositoryModelLoad": (
        "repository_model_load",
        "RepositoryModelLoadRequest",
        "RepositoryModelLoadResponse",
        False,
    ),
    "RepositoryModelUnload": (
        "repository_model_unload",
        "RepositoryModelUnloadRequest",
        "RepositoryModelUnloadResponse",
        False,
    ),
}


def _unary(
    name: str, method: Callable[[Any, Any], Awaitable[Message]]
) -> Callable[[Any, Any], Awaitable[Message]]:
    """``method``, its errors turned into statuses, counted in the metrics."""
    seconds = GRPC_SECONDS.labels(name)

    async def call(request: Any, context: Any) -> Message:
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            return await method(request, context)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            abort = exc if isinstance(exc, Abort) else as_abort(exc)
            code = abort.code
            context.set_trailing_metadata(abort.trailers)
            await context.abort(abort.code, str(abort))
            raise  # not reached: abort raises
        finally:
            GRPC_REQUESTS.labels(name, code.name).inc()
            seconds.observe(time.perf_counter() - started)

    return call


def handler(service: InferenceService) -> grpc.GenericRpcHandler:
    handlers = {}
    for rpc, (attribute, request_type, response_type, streaming) in METHODS.items():
        method = getattr(service, attribute)
        deserialize = getattr(pb, request_type).FromString
        serialize = getattr(pb, response_type).SerializeToString
        if streaming:
            handlers[rpc] = grpc.stream_stream_rpc_method_handler(
                method, request_deserializer=deserialize, response_serializer=serialize
            )
        else:
            handlers[rpc] = grpc.unary_unary_rpc_method_handler(
                _unary(rpc, method),
                request_deserializer=deserialize,
                response_serializer=serialize,
            )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


async def start(engine: Engine, settings: Settings) -> grpc.aio.Server:
    """Serves GRPCInferenceService on GRPC_PORT, on the interface HTTP binds to. With
    SO_REUSEPORT every gunicorn worker listens on the port, and the kernel spreads the
    connections between them."""
    limit = settings.max_upload_bytes  # the whole message, as the whole body over HTTP
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            # Calls received but not yet taken by this loop: past grpc's default of 1000
            # it cancels them, and an open loop at 4x the peak got CANCELLED for 8-18% of
            # its calls instead of the UNAVAILABLE (with a retry hint) admission gives.
            ("grpc.server.max_pending_requests", 4000),
            ("grpc.server.max_pending_requests_hard_limit", 8000),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
    )
    server.add_generic_rpc_handlers([handler(InferenceService(engine, settings))])
    host = settings.gunicorn_bind.rpartition(":")[0] or settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise ValueError(f"cannot listen for gRPC on {address}: set GRPC_PORT to a free port, or 0")
    await server.start()
    logger.info("gRPC: the Open Inference Protocol on %s", address)
    return server
