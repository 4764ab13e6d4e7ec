"""Stop a streaming response with one call, and see how it ended and what it cost.

    tether serve &                      # or any Responses server: OPENAI_BASE_URL=...
    python examples/cancel_stream.py    # sync;  --async for AsyncOpenAI
    python examples/cancel_stream.py --background

Environment: OPENAI_BASE_URL (default http://127.0.0.1:8000/v1), OPENAI_API_KEY,
TETHER_MODEL (default smollm2-135m, tether's embedded model), CANCEL_AFTER (deltas, 20).
"""

from __future__ import annotations

import asyncio
import os
import sys

from openai import AsyncOpenAI, OpenAI
from openai.types.responses import Response

from tether.client import cancellable

BASE_URL = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
API_KEY = os.environ.get("OPENAI_API_KEY", "unused")
MODEL = os.environ.get("TETHER_MODEL", "smollm2-135m")
CANCEL_AFTER = int(os.environ.get("CANCEL_AFTER", "20"))
BACKGROUND = "--background" in sys.argv


def report(final: Response, ignored: bool) -> None:
    usage = final.usage
    print(f"\n\nresponse {final.id}: {final.status}")
    if usage is not None:
        print(f"usage: {usage.input_tokens} input + {usage.output_tokens} output tokens")
    if ignored:
        print("warning: the server did not stop within the grace period")


def main() -> None:
    with OpenAI(base_url=BASE_URL, api_key=API_KEY) as client:
        stream = cancellable(client.responses.create(
            model=MODEL, input="Tell me a long story.", background=BACKGROUND, stream=True))
        seen = 0
        for event in stream:
            if event.type == "response.output_text.delta":
                print(event.delta, end="", flush=True)
                seen += 1
                if seen == CANCEL_AFTER:
                    break
        final = stream.cancel(grace=5)  # returns once the server has stopped (or gave up)
        for event in stream:  # the rest of the stream: closing events, then the terminal one
            if event.type == "response.output_text.delta":
                print(event.delta, end="", flush=True)
        report(final, stream.server_ignored_cancel)


async def amain() -> None:
    async with AsyncOpenAI(base_url=BASE_URL, api_key=API_KEY) as client:
        stream = cancellable(await client.responses.create(
            model=MODEL, input="Tell me a long story.", background=BACKGROUND, stream=True))
        seen = 0
        async for event in stream:
            if event.type == "response.output_text.delta":
                print(event.delta, end="", flush=True)
                seen += 1
                if seen == CANCEL_AFTER:
                    break
        final = await stream.cancel(grace=5)
        async for event in stream:
            if event.type == "response.output_text.delta":
                print(event.delta, end="", flush=True)
        report(final, stream.server_ignored_cancel)


if __name__ == "__main__":
    if "--async" in sys.argv:
        asyncio.run(amain())
    else:
        main()
