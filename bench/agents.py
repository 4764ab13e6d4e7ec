"""Agents on the embedded model: tool calls, structured output and natural endings.

    python bench/agents.py [--only auto,forced,json,endings] [--n 30]

Starts `tether serve --engine local` and measures, over prompts of its own (issue 13):
- auto: prompts that plainly ask for what one offered tool does, `tool_choice: "auto"`
  (three tools offered): how many call the right tool (goal >= 90%);
- forced: the same prompts with `required` and with the tool named: valid calls
  (a name from `tools`, arguments that validate against its schema; goal 100%);
- json: `text.format` json_schema answers that validate (goal 100%);
- endings: ordinary prompts without `max_output_tokens`: how many end `completed`
  within 512 output tokens (goal >= 90%).
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from typing import Any

import jsonschema
import openai

from _report import Chart, Transcript, progress, save
from _server import run, tether_server

MODEL = "smollm2-135m"


def _tool(name: str, description: str, props: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "name": name,
        "description": description,
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": props,
            "required": list(props),
            "additionalProperties": False,
        },
    }


S = {"type": "string"}
TOOLS = {
    "weather": _tool("get_weather", "Get the current weather in a city.", {"city": S}),
    "shell": _tool(
        "exec_command",
        "Run a shell command and return its output.",
        {"cmd": {"type": "array", "items": S}},
    ),
    "email": _tool("send_email", "Send an email to someone.", {"to": S, "subject": S, "body": S}),
    "convert": _tool(
        "convert_currency",
        "Convert an amount of money between currencies.",
        {"amount": {"type": "number"}, "from": S, "to": S},
    ),
    "timer": _tool(
        "set_timer", "Set a timer for a number of minutes.", {"minutes": {"type": "integer"}}
    ),
    "search": _tool("search_files", "Search the files of a project for a text.", {"query": S}),
}
TOOL_PROMPTS = [
    ("weather", "What's the weather in Paris?"),
    ("weather", "Is it raining in London right now? Check the weather."),
    ("weather", "Tell me the current weather in Tokyo."),
    ("weather", "How is the weather in Berlin today?"),
    ("weather", "Weather in New York, please."),
    ("shell", "Run the shell command `ls -la`."),
    ("shell", "Please run `git status` in the shell."),
    ("shell", "Execute the command: echo hello"),
    ("shell", "Run a command that prints the current directory."),
    ("shell", "Use the shell to show the date."),
    ("email", "Send an email to bob@example.com saying the meeting is at 3."),
    ("email", "Email alice@example.com with the subject 'Report' and say it's done."),
    ("email", "Please send an email to my boss that I'm sick today."),
    ("email", "Write and send an email to team@example.com about the release."),
    ("email", "Send an email to carol@example.com to say thanks."),
    ("convert", "Convert 100 US dollars to euros."),
    ("convert", "How much is 50 GBP in USD? Convert it."),
    ("convert", "Convert 20 euros to yen."),
    ("convert", "Please convert 1000 yen into dollars."),
    ("convert", "What is 75 Canadian dollars in euros? Use the currency converter."),
    ("timer", "Set a timer for 10 minutes."),
    ("timer", "Start a 5 minute timer."),
    ("timer", "Please set a timer for 25 minutes for my pomodoro."),
    ("timer", "Timer for 3 minutes, please."),
    ("timer", "Set a timer: 45 minutes."),
    ("search", "Search the project files for 'TODO'."),
    ("search", "Find where 'def main' appears in the files of this project."),
    ("search", "Search the files for the text 'password'."),
    ("search", "Look through the project files for 'import numpy'."),
    ("search", "Search files for the word 'deprecated'."),
]
ORDINARY = [
    "Say hello.",
    "What is the capital of France?",
    "Tell me a joke.",
    "Write a haiku about the sea.",
    "What is 2 + 2?",
    "Give me three tips for sleeping well.",
    "Who wrote Romeo and Juliet?",
    "What is photosynthesis?",
    "Describe a cat in two sentences.",
    "Name three colours.",
    "How do I boil an egg?",
    "What is the speed of light?",
    "Translate 'good morning' into French.",
    "Why is the sky blue?",
    "Write a short poem about autumn.",
    "What is Python?",
    "Recommend a good book.",
    "How many days are in a week?",
    "What is the largest planet?",
    "Explain gravity simply.",
    "What should I cook for dinner?",
    "Summarise the plot of Cinderella.",
    "What is a noun?",
    "Give me a motivational quote.",
    "How do plants grow?",
    "What is the boiling point of water?",
    "List the days of the week.",
    "What does a doctor do?",
    "Tell me a fun fact about dogs.",
    "How are you today?",
    "What is rain?",
    "Describe the moon.",
]
SCHEMAS = [
    ("person", {"name": S, "age": {"type": "integer"}}, "Describe a fictional person."),
    (
        "city",
        {"city": S, "country": S, "population": {"type": "integer"}},
        "Tell me about a big city.",
    ),
    ("answer", {"answer": S, "confident": {"type": "boolean"}}, "What is 2 + 2?"),
    ("book", {"title": S, "author": S, "year": {"type": "integer"}}, "Recommend a book."),
    ("colors", {"colors": {"type": "array", "items": S}}, "Name some colours."),
    (
        "mood",
        {"mood": {"type": "string", "enum": ["happy", "sad", "neutral"]}},
        "How does a sunny day feel?",
    ),
]


async def _call(client: openai.AsyncOpenAI, bar: Any, **kwargs: Any) -> Any:
    try:
        return await client.responses.create(model=MODEL, **kwargs)
    finally:
        bar.update(1)


def _calls(resp: Any) -> list[Any]:
    return [item for item in resp.output if item.type == "function_call"]


def _valid_call(call: Any, tools: dict[str, dict[str, Any]]) -> bool:
    tool = tools.get(call.name)
    if tool is None:
        return False
    try:
        jsonschema.validate(json.loads(call.arguments), tool["parameters"])
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


async def auto(client: openai.AsyncOpenAI, n: int, bar: Any) -> list[str]:
    right = valid = 0
    for i, (key, prompt) in enumerate(TOOL_PROMPTS[:n]):
        offered = _offer(i, key)
        resp = await _call(client, bar, input=prompt, tools=offered, tool_choice="auto")
        calls = _calls(resp)
        right += bool(calls) and calls[0].name == TOOLS[key]["name"]
        valid += bool(calls) and _valid_call(calls[0], {t["name"]: t for t in offered})
    total = min(n, len(TOOL_PROMPTS))
    return [
        f"auto: called the right tool | {right}/{total} ({right / total:.0%}) | >= 90%",
        f"auto: valid calls among them | {valid}/{total} | 100% of calls",
    ]


def _offer(i: int, key: str) -> list[dict[str, Any]]:
    """The asked-for tool and two others, in a varying order."""
    keys = list(TOOLS)
    others = [k for k in keys if k != key]
    chosen = [key, others[i % len(others)], others[(i + 2) % len(others)]]
    return [TOOLS[k] for k in chosen[i % 3 :] + chosen[: i % 3]]


async def forced(client: openai.AsyncOpenAI, n: int, bar: Any) -> list[str]:
    rows = []
    for label in ("required", "named"):
        ok = 0
        for i, (key, prompt) in enumerate(TOOL_PROMPTS[:n]):
            offered = _offer(i, key)
            choice: Any = (
                "required"
                if label == "required"
                else {"type": "function", "name": TOOLS[key]["name"]}
            )
            resp = await _call(client, bar, input=prompt, tools=offered, tool_choice=choice)
            calls = _calls(resp)
            ok += (
                resp.status == "completed"
                and len(calls) == 1
                and _valid_call(calls[0], {t["name"]: t for t in offered})
                and (label == "required" or calls[0].name == TOOLS[key]["name"])
            )
        total = min(n, len(TOOL_PROMPTS))
        rows.append(f"{label}: valid calls | {ok}/{total} ({ok / total:.0%}) | 100%")
    return rows


async def structured(client: openai.AsyncOpenAI, n: int, bar: Any) -> list[str]:
    ok = 0
    for i in range(n):
        name, props, prompt = SCHEMAS[i % len(SCHEMAS)]
        schema = {
            "type": "object",
            "properties": props,
            "required": list(props),
            "additionalProperties": False,
        }
        resp = await _call(
            client,
            bar,
            input=prompt,
            text={
                "format": {"type": "json_schema", "name": name, "schema": schema, "strict": True}
            },
            temperature=1.0,
        )
        try:
            jsonschema.validate(json.loads(resp.output_text), schema)
            ok += resp.status == "completed"
        except (ValueError, jsonschema.ValidationError):
            pass
    return [f"json_schema: answers that validate | {ok}/{n} ({ok / n:.0%}) | 100%"]


async def endings(client: openai.AsyncOpenAI, n: int, bar: Any) -> list[str]:
    ended, lengths = 0, []
    for prompt in ORDINARY[:n]:
        resp = await _call(client, bar, input=prompt)
        tokens = resp.usage.output_tokens
        lengths.append(tokens)
        ended += resp.status == "completed" and tokens <= 512
    total = min(n, len(ORDINARY))
    return [
        f"ordinary: completed within 512 tokens | {ended}/{total} ({ended / total:.0%}) | >= 90%",
        f"ordinary: output tokens median / max | {statistics.median(lengths):.0f} / "
        f"{max(lengths)} |",
    ]


def planned(parts: list[str], n: int) -> int:
    """How many responses the chosen parts create (for the progress bar)."""
    tools, ordinary = min(n, len(TOOL_PROMPTS)), min(n, len(ORDINARY))
    per = {"auto": tools, "forced": 2 * tools, "json": n, "endings": ordinary}
    return sum(per[p] for p in parts if p in per)


def chart(rows: list[str]) -> Chart:
    """Each measure's share (from its `k/n`) beside its goal."""
    names, shares, goals = [], [], []
    for row in rows[2:]:
        name, result, goal = (part.strip() for part in row.split("|"))
        fraction = re.search(r"(\d+)/(\d+)", result)
        if fraction is None or not int(fraction[2]):
            continue  # not a share (token counts)
        names.append(name.replace(": ", ":\n", 1))
        shares.append(100 * int(fraction[1]) / int(fraction[2]))
        wanted = re.search(r"(\d+)%", goal)
        goals.append(float(wanted[1]) if wanted else float("nan"))
    return Chart(
        "embedded model as an agent's engine", "%", names, {"result": shares, "goal": goals}
    )


async def main(parts: list[str], n: int) -> list[str]:
    bar = progress(total=planned(parts, n), desc="responses", unit="resp")
    with tether_server(engine="local") as srv:
        client = openai.AsyncOpenAI(
            base_url=srv.base_url, api_key="bench", max_retries=0, timeout=600
        )
        rows = ["measure | result | goal", "--- | --- | ---"]
        for part, fn in (
            ("auto", auto),
            ("forced", forced),
            ("json", structured),
            ("endings", endings),
        ):
            if part in parts:
                started = time.monotonic()
                new = await fn(client, n, bar)
                new[-1] += f" ({time.monotonic() - started:.0f} s)"
                rows += new
                print(*new, sep="\n", flush=True)
        bar.close()
        print("\n" + "\n".join(f"| {r} |" for r in rows))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="auto,forced,json,endings")
    parser.add_argument("--n", type=int, default=30)
    args = parser.parse_args()
    with Transcript() as printed:
        rows = run(main(args.only.split(","), args.n))
    save("agents", printed.text, chart(rows))
