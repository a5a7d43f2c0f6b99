"""
A local HTTP server around [`~clip_diffusionlm.hub.handler.EndpointHandler`], shaped like the one Inference Endpoints run:
`POST /` with a JSON request (`{"inputs": base64, "parameters": {...}}`) or raw image bytes, `GET /health`.

    python -m clip_diffusionlm.hub.serving path/to/pipeline --port 8080
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .handler import EndpointHandler, HandlerError, PayloadTooLargeError

logger = logging.getLogger("clip_diffusionlm.serving")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is longer than `limit` (without reading the rest)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"The request has {declared} bytes, over the limit of {limit}.")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise PayloadTooLargeError(f"The request is over the limit of {limit} bytes.")
    return bytes(body)


def create_app(handler: EndpointHandler) -> Starlette:
    """
    A Starlette app serving `handler` (this package's [`EndpointHandler`] or a repository's `handler.py`); run it with any ASGI server (uvicorn). Refused requests get their status (400,
    413) and `{"error": message}`; anything unexpected a 500 without internals, logged here.
    """

    async def predict(request: Request) -> JSONResponse:
        try:
            body = await _read_body(request, handler.max_request_bytes)
            if request.headers.get("content-type", "").startswith("application/json"):
                try:
                    data = json.loads(body)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise HandlerError("The request body is not valid JSON.") from None
            else:
                data = {"inputs": body}
            result = await run_in_threadpool(handler, data)
        except Exception as error:
            # A refused request carries its status: our HandlerError, or the same class of a repository's own
            # handler.py (a different class object, loaded from that file).
            status = getattr(error, "status_code", None)
            if isinstance(status, int) and 400 <= status < 500:
                return JSONResponse({"error": str(error)}, status_code=status)
            logger.exception("Captioning failed")
            return JSONResponse({"error": "Captioning failed on the server; see its log."}, status_code=500)
        return JSONResponse(result)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/", predict, methods=["POST"]), Route("/health", health, methods=["GET"])])


def main(argv: Sequence[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m clip_diffusionlm.hub.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="A saved pipeline folder (or Hub repository id).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(EndpointHandler(args.path)), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
