"""A streaming response whose client leaves while a chunk is being sent still closes its body and runs on_end."""
import asyncio

from fastapi.responses import StreamingResponse

from workers.serving.ending_stream import EndingStreamingResponse

SCOPE = {"type": "http", "asgi": {"spec_version": "2.3"}}  # uvicorn's: Starlette listens for the disconnect


def leave_during_send(make_response):
    """Serve a response whose second chunk's send() never returns (the write buffer is full) and whose client then
    leaves; return what the body generator and on_end saw."""
    seen = {"closed": False, "ended": None, "sending": False}

    async def body():
        try:
            while True:
                yield b"chunk"
        finally:
            seen["closed"] = True

    async def on_end(scope):
        seen["ended"] = scope

    async def main():
        stuck, gone = asyncio.Event(), asyncio.Event()

        async def send(message):
            if message["type"] == "http.response.body" and seen["sending"]:
                gone.set()
                await stuck.wait()
            seen["sending"] = message["type"] == "http.response.body"

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}

        response = make_response(body(), on_end)
        await asyncio.wait_for(response(dict(SCOPE), receive, send), 5)
        seen["closed_when_over"] = seen["closed"]  # asyncio.run closes every generator left at its end

    asyncio.run(main())
    return seen


def test_a_client_that_leaves_during_send_closes_the_body_and_ends_the_response():
    seen = leave_during_send(lambda body, on_end: EndingStreamingResponse(body, on_end))
    assert seen["closed_when_over"], "the body generator was left suspended at its yield"
    assert seen["ended"] is not None and seen["ended"]["type"] == "http"


def test_starlette_alone_leaves_the_body_suspended_then():
    """Why EndingStreamingResponse exists: the same departure leaves a plain StreamingResponse's body open."""
    seen = leave_during_send(lambda body, _on_end: StreamingResponse(body))
    assert not seen["closed_when_over"]
