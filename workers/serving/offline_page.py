"""ASGI middleware: remove references to external hosts from HTML pages, so the web UI renders
fully on a machine without internet access.

gradio 4.44's page template loads iframeResizer from cdnjs and preconnects to Google Fonts; the
browser would try (and on an offline machine, fail) to reach them on every page load.
"""
from __future__ import annotations

import re

_EXTERNAL = re.compile(
    rb"<script[^>]*\bsrc=\"https?://[^\"]+\"[^>]*>\s*</script>"
    rb"|<link[^>]*\bhref=\"https?://[^\"]+\"[^>]*/?>",
    re.IGNORECASE,
)


def strip_external(html: bytes) -> bytes:
    return _EXTERNAL.sub(b"", html)


class OfflinePage:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        start: dict = {}
        body = bytearray()

        async def capture(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                if not headers.get(b"content-type", b"").startswith(b"text/html"):
                    start["passthrough"] = True
                    return await send(message)
                start["message"] = message
            elif start.get("passthrough"):
                return await send(message)
            else:
                body.extend(message.get("body", b""))
                if not message.get("more_body"):
                    page = strip_external(bytes(body))
                    headers = [(k, v) for k, v in start["message"].get("headers", []) if k.lower() != b"content-length"]
                    headers.append((b"content-length", str(len(page)).encode()))
                    await send({**start["message"], "headers": headers})
                    await send({"type": "http.response.body", "body": page})

        await self.app(scope, receive, capture)
