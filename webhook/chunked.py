"""Request bodies sent with Transfer-Encoding: chunked, held to the same size limit as the rest."""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any


class ChunkedBodyLimit:
    """WSGI middleware: a chunked body has no Content-Length to refuse it by, and werkzeug quietly
    stops reading it at MAX_CONTENT_LENGTH, so an oversized one would be judged cut short (a bad
    signature, 403). Such a body is read here, up to one byte past `limit`, and handed on with the
    length read: within the limit it is any other request; past it, the app refuses it as it
    refuses any oversized body (413, logged and counted), without reading the rest."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            body = _read_up_to(environ["wsgi.input"], self.limit + 1)
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            del environ["HTTP_TRANSFER_ENCODING"]  # werkzeug ignores a Content-Length beside it
        return self.app(environ, start_response)


def _read_up_to(stream: Any, size: int) -> bytes:
    chunks, left = [], size
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
