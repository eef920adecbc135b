"""GET /docs: the API's documentation (Swagger UI) from files the server holds, so that it
renders offline. FastAPI's own page loads its scripts from a CDN; this one loads Swagger
UI 5 as the fastapi-offline package ships it (only its files are used) and a starter
script of ours, with no inline script. There is no /redoc: ReDoc fetches its logo from
its CDN."""

from html import escape
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from api.routes.page import PageFile, read_files, serve_file

ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
START = Path(__file__).resolve().parent.parent / "docs_page"
_VENDOR = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")

# Only this server, as for the page; Swagger UI sets inline styles and draws its icons
# from data: URIs.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline';"
        " object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def read_docs_assets() -> dict[str, PageFile]:
    files = read_files(ASSETS, _VENDOR, "the fastapi-offline package")
    missing = set(_VENDOR) - set(files)
    if missing:
        raise ValueError(
            f"the fastapi-offline package lacks {', '.join(sorted(missing))}: reinstall"
            " requirements.txt"
        )
    return {**files, **read_files(START, ["start.js"], "api/docs_page")}


def _page(title: str, root: str) -> str:
    assets = f"{root}/docs/assets"
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{escape(title)}</title><link rel="icon" href="{assets}/favicon.png">'
        f'<link rel="stylesheet" href="{assets}/swagger-ui.css"></head><body>'
        f'<div id="swagger-ui" data-openapi="{root}/openapi.json"></div>'
        f'<script src="{assets}/swagger-ui-bundle.js"></script>'
        f'<script src="{assets}/start.js"></script></body></html>'
    )


def docs_router(title: str) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    files = read_docs_assets()

    @router.get("/docs")
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = escape(request.scope.get("root_path", ""))
        return HTMLResponse(_page(f"{title} - API", root), headers=HEADERS)

    @router.get("/docs/assets/{name}")
    async def asset(name: str, request: Request) -> Response:
        return serve_file(files, name, request, HEADERS)

    return router
