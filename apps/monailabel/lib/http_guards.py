"""The HTTP side of the app's request checks, installed into MONAI Label's FastAPI app when the server starts.

- Exception handlers: every failure answers ``{"detail": message}`` (FastAPI's own error format) with the status
  of :func:`lib.errors.status_code_of` (4xx for the client's mistakes, 500 otherwise) and a message that names
  the problem, instead of a bare "Internal Server Error".
- MONAI Label's routes that take uploads or JSON form fields are shadowed by guarded copies: a ``params`` or
  ``info`` field must be a JSON object (400), and a failed request removes its temporary upload files (MONAI
  Label's endpoints remove them only after a success).
- ``POST /infer/{model}``: ``params`` may not replace the request's ``image`` or ``label`` (MONAI Label would
  read those as file paths), an unknown ``session_id`` is a 404, and whether the image was uploaded (``file=``
  or a session) or named by id is recorded for ``MONAILabelApp.infer`` (:func:`request_input_is_upload`).
"""

from __future__ import annotations

import functools
import json
import logging
from contextvars import ContextVar
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, APIRouter
from monailabel.config import settings
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.utils.app import app_instance

from lib.datastore import check_name
from lib.errors import RequestError, message_of, status_code_of

logger = logging.getLogger(__name__)

JSON_FORM_FIELDS = ("params", "info")
RESERVED_INFER_PARAMS = ("image", "label")

InputCheck = Callable[[dict[str, Any]], bool]  # checks an endpoint's arguments; True when the image is an upload

_UPLOADED_INPUT: ContextVar[bool] = ContextVar("uploaded_input", default=False)


def request_input_is_upload() -> bool:
    """Whether the ``POST /infer/{model}`` request being served brought its image (``file=`` or ``session_id``).

    Then MONAI Label has put the server-made path of that upload in ``request["image"]``; otherwise (any other
    caller too) ``request["image"]`` is what the client named and must be a datastore id.
    """
    return _UPLOADED_INPUT.get()


async def error_response(request: Request, error: Exception) -> JSONResponse:
    """``{"detail": message}`` with the status of :func:`lib.errors.status_code_of`."""
    status_code, message = status_code_of(error), message_of(error)
    if status_code >= 500:
        logger.error(f"{request.method} {request.url.path} failed: {message}")
    else:
        logger.info(f"{request.method} {request.url.path} refused ({status_code}): {message}")
    return JSONResponse({"detail": message}, status_code=status_code)


def _check_json_fields(kwargs: dict[str, Any]) -> None:
    for field in JSON_FORM_FIELDS:
        text = kwargs.get(field)
        if not isinstance(text, str) or not text:
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as error:
            raise RequestError(400, f"form field '{field}' is not valid JSON: {error}") from error
        if not isinstance(value, dict):
            raise RequestError(400, f"form field '{field}' must be a JSON object, got {type(value).__name__}")


def _infer_input_is_upload(kwargs: dict[str, Any]) -> bool:
    """Checks the inputs of ``POST /infer/{model}``; True when the image is an upload (``file=`` or a session)."""
    params = json.loads(kwargs.get("params") or "{}")
    reserved = [key for key in RESERVED_INFER_PARAMS if key in params]
    if reserved:
        raise RequestError(
            400, f"params may not set {reserved}: name the image with ?image=<datastore id> or upload it as file=..."
        )
    session_id = kwargs.get("session_id")
    if session_id:
        check_name(session_id, "session_id", "session ids are what POST /session/ returns")
        sessions = app_instance().sessions()
        if sessions is None or sessions.get_session(session_id) is None:
            raise RequestError(404, f"session_id {session_id!r} is unknown or has expired")
        return True
    if kwargs.get("file") is not None:
        return True
    if not kwargs.get("image"):
        raise RequestError(400, "no input image: give ?image=<datastore id>, upload one as file=..., or a session_id")
    return False


def _guarded(endpoint: Callable, input_is_upload: InputCheck | None) -> Callable:
    """``endpoint`` (an async FastAPI endpoint, same signature) behind the checks of this module."""

    @functools.wraps(endpoint)
    async def guarded(**kwargs: Any) -> Any:
        try:
            _check_json_fields(kwargs)
            token = _UPLOADED_INPUT.set(bool(input_is_upload and input_is_upload(kwargs)))
            try:
                return await endpoint(**kwargs)
            finally:
                _UPLOADED_INPUT.reset(token)
        except Exception:
            background_tasks = kwargs.get("background_tasks")
            if background_tasks is not None:
                await background_tasks()  # removes the request's temporary upload files
            raise

    return guarded


def _guarded_routes() -> list[tuple[APIRouter, Callable, InputCheck | None]]:
    """``(MONAI Label's router, its endpoint, input check)`` of each route to guard."""
    from monailabel.endpoints import datastore, infer

    return [
        (infer.router, infer.api_run_inference, _infer_input_is_upload),
        (datastore.router, datastore.api_add_image, None),
        (datastore.router, datastore.api_save_label, None),
        (datastore.router, datastore.api_put_image_info, None),
        (datastore.router, datastore.api_put_label_info, None),
        (datastore.router, datastore.api_update_label_info, None),
    ]


def _shadow_routes(fastapi_app: FastAPI, prefix: str) -> None:
    """Puts a guarded copy of each route of :func:`_guarded_routes` first in ``fastapi_app``'s routes.

    The router tries routes in order, so the copy (same path, methods and parameters) answers the route's
    requests; MONAI Label's original stays in the OpenAPI schema, the copy is left out of it.
    """
    shadows = []
    for router, endpoint, input_check in _guarded_routes():
        routes = [route for route in router.routes if isinstance(route, APIRoute) and route.endpoint is endpoint]
        if not routes:
            logger.warning(f"No route of {endpoint.__module__}.{endpoint.__name__}: its requests are not guarded")
        for route in routes:
            shadows.append(
                APIRoute(
                    prefix + route.path,
                    _guarded(endpoint, input_check),
                    methods=sorted(route.methods),
                    name=f"guarded_{route.name}",
                    include_in_schema=False,
                    dependency_overrides_provider=fastapi_app,
                )
            )
    fastapi_app.router.routes[:0] = shadows


def install_request_guards(fastapi_app: FastAPI) -> None:
    """Installs the exception handlers and guarded routes of this module into ``fastapi_app`` (once).

    MONAI Label builds the app instance inside the server's lifespan, after the middleware stack (which holds
    the exception handlers) was built, so the stack is dropped here and rebuilt by Starlette on the next request.
    """
    if getattr(fastapi_app.state, "app_request_guards", False):
        return
    for error_type in (RequestError, MONAILabelException, Exception):
        fastapi_app.add_exception_handler(error_type, error_response)
    _shadow_routes(fastapi_app, settings.MONAI_LABEL_API_STR)
    fastapi_app.middleware_stack = None
    fastapi_app.state.app_request_guards = True
    logger.info("Request guards installed: datastore ids only, uploads checked, errors answered with messages")
