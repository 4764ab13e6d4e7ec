"""The `tether` command: `tether serve` (API, and runs unless `--workers 0`) and
`tether worker` (runs only, scaled out)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
import uvicorn

from tether.config import Settings, load_settings


@click.group()
def main() -> None:
    """tether: a self-hosted OpenAI Responses API server where cancel means stop."""


def _common(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `serve` and `worker` (applied bottom-up, listed top-down)."""
    options = [
        click.option("--host", help="Address to bind (default 127.0.0.1)."),
        click.option("--db", help="SQLite database file (default ./tether.db), or "
                                  "postgresql://... to scale out (with --redis)."),
        click.option("--redis", help="redis://... : run queue, live streams and cancel "
                                     "signals shared by replicas and workers."),
        click.option("--redis-prefix", help="Key prefix in Redis (default tether)."),
        click.option("--workers", type=click.IntRange(min=0),
                     help="Runs this process executes at once (default: what the engine "
                          "allows); 0 = API only."),
        click.option("--engine", type=click.Choice(["local", "scripted", "none"]),
                     help="local: embedded SmolLM2-135M (default without upstreams); "
                          "scripted: deterministic text; none: upstreams only (default "
                          "with upstreams)."),
        click.option("--upstream", multiple=True,
                     help="MODEL=[chat+|responses+]URL[,option=value...]: serve MODEL "
                          "through an OpenAI-compatible upstream (repeatable). See README, "
                          "Upstream engines."),
        click.option("--config", "config", type=click.Path(dir_okay=False),
                     help="TOML config file (settings and [[upstreams]] tables)."),
        click.option("--scripted-rate", type=float,
                     help="Scripted tokens per second; 0 = max."),
        click.option("--scripted-length", type=int, help="Scripted tokens per response."),
        click.option("--cancel-timeout", type=float,
                     help="Seconds a cancel waits for the run."),
        click.option("--lease-timeout", type=float,
                     help="Seconds before a lost run is ended."),
        click.option("--keepalive", type=float,
                     help="Seconds between SSE keepalive comments."),
        click.option("--retention", type=float,
                     help="Seconds a finished log stays streamable."),
        click.option("--max-body-bytes", type=int, help="Largest request body accepted."),
        click.option("--debug-routes/--no-debug-routes", default=None,
                     help="Expose /debug/engine/{id} (scripted engine traces)."),
        click.option("--log-level", help="Log level (default warning)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _settings(options: dict[str, Any]) -> Settings:
    options["upstream"] = list(options["upstream"]) or None
    try:
        settings = load_settings(**options)
        settings.all_upstreams()  # a bad --upstream flag fails here, not at startup
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return settings


def _run(settings: Settings, worker_only: bool) -> None:
    from tether.app import create_app

    try:
        app = create_app(settings, worker_only)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=3,
    )


@main.command()
@click.option("--port", type=int, help="Port (default 8000).")
@_common
def serve(**options: Any) -> None:
    """Serve the Responses API. Flags override TETHER_* environment variables."""
    _run(_settings(options), worker_only=False)


@main.command()
@click.option("--port", type=int, default=0, show_default=True,
              help="Port of the worker's /health (and debug) routes; 0 = any free port.")
@_common
def worker(**options: Any) -> None:
    """Run responses (no API), with others on the same --db postgresql:// and --redis."""
    _run(_settings(options), worker_only=True)


if __name__ == "__main__":
    main()
