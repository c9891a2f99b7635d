"""A streaming response that closes its body and runs `on_end` however it ends: finished, failed, or its client gone.

Starlette's StreamingResponse stops a stream whose client left by cancelling it wherever it awaits. When that is in
send() (the client reads slowly and the socket's write buffer is full), the body generator is left suspended at its
yield: its `finally` runs only when the garbage collector gets to it, and whatever it would stop (a generation, a
connection to a worker) goes on meanwhile.
"""
from __future__ import annotations

from typing import Awaitable, Callable

from fastapi.responses import StreamingResponse


class EndingStreamingResponse(StreamingResponse):
    def __init__(self, content, on_end: Callable[[dict], Awaitable[None]], **kwargs):
        """`on_end(scope)`: awaited once the response is over, after its body generator was closed."""
        super().__init__(content, **kwargs)
        self.on_end = on_end

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                await self.on_end(scope)
