"""The web page for people: GET / is WEB_DIR's index.html (the shipped web/ by default) and
GET /web/{name} its other files. The folder is read once when the app is built and served
from memory, so a request's path is only ever a key into that table."""

import hashlib
import mimetypes
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response

SHIPPED = Path(__file__).resolve().parent.parent.parent / "web"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_PAGE_BYTES = 5 * 1024 * 1024

# The page is a client of this server only: no other origin, no inline script or style.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none';"
        " frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class PageFile:
    body: bytes
    media_type: str
    etag: str


def read_files(folder: Path, names: Iterable[str], what: str) -> dict[str, PageFile]:
    """The files ``names`` of ``folder`` (those there), read once into memory. Raises
    ValueError naming ``what`` when they hold more than MAX_PAGE_BYTES."""
    files: dict[str, PageFile] = {}
    total = 0
    for name in sorted(names):
        path = folder / name
        if not path.is_file() or not _NAME.fullmatch(name):
            continue
        body = path.read_bytes()
        total += len(body)
        if total > MAX_PAGE_BYTES:
            raise ValueError(
                f"{what}={str(folder)!r} holds over {MAX_PAGE_BYTES // 2**20} MiB:"
                " it should hold one page's files"
            )
        media_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        if media_type.startswith("text/") or media_type == "application/javascript":
            media_type += "; charset=utf-8"
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        files[name] = PageFile(body, media_type, etag)
    return files


def read_page(folder: Path | None) -> dict[str, PageFile]:
    """The page's files by name. Raises ValueError naming WEB_DIR when the folder has no
    index.html or holds more than a page should."""
    folder = folder or SHIPPED
    if not (folder / "index.html").is_file():
        raise ValueError(f"WEB_DIR={str(folder)!r} has no index.html: point it at a page's folder")
    return read_files(folder, (path.name for path in folder.iterdir()), "WEB_DIR")


def serve_file(
    files: dict[str, PageFile], name: str, request: Request, headers: dict[str, str]
) -> Response:
    """One of ``files``, or 304 when the client holds it already; 404 for another name."""
    file = files.get(name)
    if file is None:
        raise HTTPException(404, f"no file {name!r} here; the page is at /, the API's at /docs")
    headers = {**headers, "ETag": file.etag}
    if request.headers.get("if-none-match") == file.etag:
        return Response(status_code=304, headers=headers)
    return Response(file.body, media_type=file.media_type, headers=headers)


def page_router(files: dict[str, PageFile]) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get("/")
    async def page(request: Request) -> Response:
        return serve_file(files, "index.html", request, HEADERS)

    @router.get("/web/{name}")
    async def page_file(name: str, request: Request) -> Response:
        return serve_file(files, name, request, HEADERS)

    return router
