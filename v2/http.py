"""The Open Inference Protocol over HTTP, on the server's own port: ``/v2`` and its
health, model metadata, ready, config, stats and infer routes, with Triton's
``binary_tensor_data`` extension (a JSON header, then the raw tensors it sizes).

Errors are ``{"error": ...}`` with the statuses of ``POST /cls``: 400 bad input, 404
unknown model, 413 too large, 503 with Retry-After, 504 past the deadline.
"""

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api.deps import EngineDep
from api.disconnect import cancel_on_disconnect
from api.errors import ClientDisconnected, error_response
from api.payloads import PARSE_INLINE_BYTES, gathered
from serving import Engine, InputError, NotReady
from v2 import core
from v2.core import InferRequest, InferResponse, Requested
from v2.tensors import Tensor, check_header, from_list, from_raw, to_list, to_raw

logger = logging.getLogger(__name__)
HEADER_LENGTH = "inference-header-content-length"

router = APIRouter(prefix="/v2", include_in_schema=False)


def infer_paths(task: str, version: str) -> list[tuple[str, tuple[str, str]]]:
    """The paths of a task's infer route, each with the task and version it reaches
    ("": the newest), for the door to judge before the body."""
    return [
        (f"/v2/models/{task}/infer", (task, "")),
        (f"/v2/models/{task}/versions/{version}/infer", (task, version)),
    ]


def _error(exc: BaseException) -> Response:
    response = error_response(exc, "error")
    if response.status_code == 500:
        logger.error("%s failed", exc, exc_info=exc)
    return response


@router.get("")
async def server_metadata(engine: EngineDep) -> JSONResponse:
    return JSONResponse(core.server_metadata(engine))


@router.get("/health/live")
async def live(engine: EngineDep) -> Response:
    if (reason := engine.liveness()) is not None:
        return _error(NotReady(reason))
    return JSONResponse({"live": True})


@router.get("/health/ready")
async def ready(engine: EngineDep) -> Response:
    if (reason := engine.readiness()) is not None:
        return _error(NotReady(reason))
    return JSONResponse({"ready": True})


@router.post("/repository/index")
async def repository_index(request: Request, engine: EngineDep) -> Response:
    body = await gathered(request)
    try:
        options = json.loads(body) if body.strip() else {}
    except ValueError:
        options = None
    if not isinstance(options, dict):
        return _error(InputError('send a JSON object, {"ready": true} or {}'))
    return JSONResponse(core.repository_index(engine, bool(options.get("ready"))))


async def _control_parameters(request: Request) -> dict[str, Any]:
    body = await gathered(request)
    try:
        options = json.loads(body) if body.strip() else {}
    except ValueError:
        options = None
    if not isinstance(options, dict):
        raise InputError('send a JSON object, or nothing: {"parameters": {...}}')
    return _parameters(options.get("parameters"), "the request")


@router.post("/repository/models/{name}/load")
async def load_model(request: Request, engine: EngineDep, name: str) -> Response:
    try:
        parameters = await _control_parameters(request)
        await core.control(engine, parameters).load(name, core.load_config(parameters))
    except Exception as exc:
        return _error(exc)
    return Response(status_code=200)


@router.post("/repository/models/{name}/unload")
async def unload_model(request: Request, engine: EngineDep, name: str) -> Response:
    try:
        control = core.control(engine, await _control_parameters(request))
        await control.unload(name)
    except Exception as exc:
        return _error(exc)
    return Response(status_code=200)


@router.get("/models/stats")
async def all_statistics(engine: EngineDep) -> JSONResponse:
    return JSONResponse(core.statistics(engine))


def _model_routes(suffix: str, handler: Any, methods: list[str]) -> None:
    for prefix in ("/models/{name}", "/models/{name}/versions/{version}"):
        router.add_api_route(prefix + suffix, handler, methods=methods)


def _answer(make: Callable[[], Any]) -> Response:
    """``make()``'s JSON, or the protocol's answer for the error it raised."""
    try:
        return JSONResponse(make())
    except Exception as exc:
        return _error(exc)


async def model_metadata(engine: EngineDep, name: str, version: str = "") -> Response:
    return _answer(lambda: core.model_metadata(engine, core.find(engine, name, version)))


def _ready(engine: Engine, name: str, version: str) -> dict[str, Any]:
    if (not_ready := core.model_not_ready(engine, core.find(engine, name, version))) is not None:
        raise not_ready
    return {"name": name, "ready": True}


async def model_ready(engine: EngineDep, name: str, version: str = "") -> Response:
    return _answer(lambda: _ready(engine, name, version))


async def model_config(engine: EngineDep, name: str, version: str = "") -> Response:
    return _answer(lambda: core.model_config(core.find(engine, name, version)))


async def model_statistics(engine: EngineDep, name: str, version: str = "") -> Response:
    return _answer(lambda: core.statistics(engine, name, version))


async def model_infer(
    request: Request, engine: EngineDep, name: str, version: str = ""
) -> Response:
    try:
        core.find(engine, name, version).require_warm()  # before the body is read
        infer_request = await read_infer_request(request, name, version)
        with engine.lease(name, version) as service:  # answered even if unloaded meanwhile
            answer = core.infer(service, infer_request, engine.settings.max_queue_size)
            response = await cancel_on_disconnect(request, answer)
    except ClientDisconnected:
        raise  # nobody to answer: logged as 499
    except Exception as exc:
        return _error(exc)
    return render(response, binary_default=bool(infer_request.parameters.get("binary_data_output")))


_model_routes("", model_metadata, ["GET"])
_model_routes("/ready", model_ready, ["GET"])
_model_routes("/config", model_config, ["GET"])
_model_routes("/stats", model_statistics, ["GET"])
_model_routes("/infer", model_infer, ["POST"])


async def read_infer_request(request: Request, name: str, version: str) -> InferRequest:
    """The request's JSON header and, after it, the raw tensors it sizes."""
    body = await gathered(request)
    length_header = request.headers.get(HEADER_LENGTH)
    if length_header is None:
        header_length = len(body)
    elif not length_header.isdigit() or int(length_header) > len(body):
        raise InputError(f"{HEADER_LENGTH} must be the JSON header's size, at most the body's")
    else:
        header_length = int(length_header)
    header_bytes = body if header_length == len(body) else bytes(memoryview(body)[:header_length])
    try:
        if header_length <= PARSE_INLINE_BYTES:
            header = json.loads(header_bytes)
        else:
            header = await asyncio.to_thread(json.loads, header_bytes)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InputError(
            "the request is not a JSON inference request: send"
            ' {"inputs": [{"name", "datatype", "shape", "data"}]} (tritonclient does)'
        ) from None
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise InputError('the JSON header needs "inputs", a list of tensors')
    binary = memoryview(body)[header_length:]
    inputs = []
    at = 0
    for number, entry in enumerate(header["inputs"]):
        if not isinstance(entry, dict):
            raise InputError(f"input {number} is not an object")
        tensor_name = str(entry.get("name", number))
        datatype, shape = check_header(tensor_name, entry.get("datatype"), entry.get("shape"))
        parameters = _parameters(entry.get("parameters"), f"input {tensor_name!r}")
        size = parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or at + size > len(binary):
                raise InputError(f"input {tensor_name!r}: binary_data_size runs past the body")
            data = from_raw(tensor_name, datatype, shape, binary[at : at + size])
            at += size
        else:
            data = from_list(tensor_name, datatype, shape, entry.get("data"))
        inputs.append(Tensor(tensor_name, datatype, shape, data))
    if at != len(binary):
        raise InputError(f"{len(binary) - at} bytes after the tensors that binary_data_size sizes")
    outputs = []
    for entry in header.get("outputs") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InputError('each of "outputs" needs a "name"')
        outputs.append(Requested(entry["name"], _parameters(entry.get("parameters"), "output")))
    request_id = header.get("id", "")
    return InferRequest(
        model=name,
        version=version,
        id=request_id if isinstance(request_id, str) else str(request_id),
        inputs=inputs,
        outputs=outputs,
        parameters=_parameters(header.get("parameters"), "the request"),
    )


def _parameters(value: Any, whose: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"the parameters of {whose} must be an object")
    return value


def render(response: InferResponse, binary_default: bool) -> Response:
    """The response's JSON, followed by the raw outputs asked for in binary."""
    outputs = []
    raw: list[bytes] = []
    for tensor in response.outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if tensor.parameters.get("binary_data", binary_default):
            data = to_raw(tensor.data, tensor.datatype)
            entry["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            entry["data"] = to_list(tensor.data, tensor.datatype)
        outputs.append(entry)
    header = {"model_name": response.model, "model_version": response.version, "outputs": outputs}
    if response.id:
        header["id"] = response.id
    text = json.dumps(header, separators=(",", ":")).encode()
    if not raw:
        return Response(text, media_type="application/json")
    return Response(
        b"".join([text, *raw]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(text))},
    )
