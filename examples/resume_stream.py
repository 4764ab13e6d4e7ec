"""Read a background response's stream across network blips, each event exactly once.

    tether serve &                      # or any Responses server: OPENAI_BASE_URL=...
    python examples/resume_stream.py    # sync;  --async for AsyncOpenAI

It starts a background response, then reads it twice: with `resumable(client, id)` (raw
events, resumed with `retrieve(id, stream=True, starting_after=last_seen)` after a dropped
connection or a timeout), and with the `responses.stream()` helper wrapped by
`cancellable()`, which resumes the helper so `get_final_response()` stays complete.
Environment: OPENAI_BASE_URL (default http://127.0.0.1:8000/v1), OPENAI_API_KEY,
TETHER_MODEL (default smollm2-135m), MAX_OUTPUT_TOKENS (default 40).
"""

from __future__ import annotations

import asyncio
import os
import sys

from openai import AsyncOpenAI, OpenAI

from tether.client import Backoff, cancellable, resumable

BASE_URL = os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
API_KEY = os.environ.get("OPENAI_API_KEY", "unused")
MODEL = os.environ.get("TETHER_MODEL", "smollm2-135m")
MAX_OUTPUT_TOKENS = int(os.environ.get("MAX_OUTPUT_TOKENS", "40"))
BACKOFF = Backoff(initial=0.25, maximum=8.0, max_attempts=8)  # the defaults, spelled out


def main() -> None:
    with OpenAI(base_url=BASE_URL, api_key=API_KEY) as client:
        started = client.responses.create(model=MODEL, input="Write a haiku.",
                                          background=True, max_output_tokens=MAX_OUTPUT_TOKENS)
        last = -1
        for event in resumable(client, started.id, backoff=BACKOFF):
            assert event.sequence_number == last + 1  # exactly once, in order
            last = event.sequence_number
            if event.type == "response.output_text.delta":
                print(event.delta, end="", flush=True)
        print(f"\n[{last + 1} events]")

        with client.responses.stream(model=MODEL, input="Write a haiku.", background=True,
                                     max_output_tokens=MAX_OUTPUT_TOKENS) as helper:
            stream = cancellable(helper, backoff=BACKOFF)  # background: resumes by itself
            for event in stream:
                if event.type == "response.output_text.delta":
                    print(event.delta, end="", flush=True)
            final = stream.get_final_response()
        print(f"\n[{final.id}: {final.status}, {final.usage and final.usage.output_tokens} tokens]")


async def amain() -> None:
    async with AsyncOpenAI(base_url=BASE_URL, api_key=API_KEY) as client:
        started = await client.responses.create(model=MODEL, input="Write a haiku.",
                                                background=True,
                                                max_output_tokens=MAX_OUTPUT_TOKENS)
        async for event in resumable(client, started.id, backoff=BACKOFF):
            if event.type == "response.output_text.delta":
                print(event.delta, end="", flush=True)
        stream = resumable(client, started.id, starting_after=3)  # a late reader
        final = await stream.get_final_response()
        print(f"\n[{final.id}: {final.status}, {final.usage and final.usage.output_tokens} tokens]")


if __name__ == "__main__":
    if "--async" in sys.argv:
        asyncio.run(amain())
    else:
        main()
