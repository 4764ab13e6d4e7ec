"""The `tether` command: `tether serve` (API, and runs unless `--workers 0`) and
`tether worker` (runs only, scaled out)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
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
        click.option(
            "--db",
            help="SQLite database file (default ./tether.db), or "
            "postgresql://... to scale out (with --redis).",
        ),
        click.option(
            "--db-read",
            help="postgresql://... of a streaming read replica of --db: finished "
            "logs are replayed from it (a log it has not finished is read from --db).",
        ),
        click.option(
            "--redis",
            help="redis://... (one server) or redis+cluster://host:port,host:port,... "
            "(a Redis Cluster): run queue, live streams and cancel signals shared by "
            "replicas and workers.",
        ),
        click.option("--redis-prefix", help="Key prefix in Redis (default tether)."),
        click.option(
            "--workers",
            type=click.IntRange(min=0),
            help="Runs this process executes at once (default: what the engine "
            "allows); 0 = API only.",
        ),
        click.option(
            "--engine",
            type=click.Choice(["local", "scripted", "none"]),
            help="local: embedded SmolLM2-135M (default without upstreams); "
            "scripted: deterministic text; none: upstreams only (default "
            "with upstreams).",
        ),
        click.option(
            "--upstream",
            multiple=True,
            help="MODEL=[chat+|responses+]URL[,option=value...]: serve MODEL "
            "through an OpenAI-compatible upstream (repeatable). See README, "
            "Upstream engines.",
        ),
        click.option(
            "--config",
            "config",
            type=click.Path(dir_okay=False),
            help="TOML config file (settings and [[upstreams]] tables).",
        ),
        click.option("--scripted-rate", type=float, help="Scripted tokens per second; 0 = max."),
        click.option("--scripted-length", type=int, help="Scripted tokens per response."),
        click.option("--cancel-timeout", type=float, help="Seconds a cancel waits for the run."),
        click.option("--lease-timeout", type=float, help="Seconds before a lost run is ended."),
        click.option(
            "--deferred-slots",
            type=int,
            help="Run slots 2h/8h responses may hold at once (default: half).",
        ),
        click.option(
            "--window-reserve",
            type=float,
            help="Seconds a 2h/8h response keeps for its run before its window ends.",
        ),
        click.option("--keepalive", type=float, help="Seconds between SSE keepalive comments."),
        click.option("--retention", type=float, help="Seconds a finished log stays streamable."),
        click.option("--max-body-bytes", type=int, help="Largest request body accepted."),
        click.option(
            "--header-timeout",
            type=click.FloatRange(min=0, min_open=True),
            help="Seconds a request's headers may take to arrive (default 10).",
        ),
        click.option(
            "--body-timeout",
            type=click.FloatRange(min=0, min_open=True),
            help="Seconds a request's body may take to arrive (default 60).",
        ),
        click.option(
            "--log-cache-bytes",
            type=click.IntRange(min=0),
            help="Bytes of event logs kept in memory for readers (default 64 MiB); "
            "older finished logs are read from the database.",
        ),
        click.option(
            "--websocket-limit",
            type=float,
            help="Seconds a WebSocket connection lives (default 3600).",
        ),
        click.option(
            "--hosted-tools",
            type=click.Choice(["refuse", "drop"]),
            help="Hosted tools tether cannot run (web_search, ...): refuse the "
            "request (default) or drop them with a note.",
        ),
        click.option(
            "--mcp-host",
            "mcp_hosts",
            multiple=True,
            help="A host whose MCP servers runs may call (repeatable; `loopback`: "
            "any loopback address, the default; `*`: any host).",
        ),
        click.option(
            "--mcp-timeout",
            type=click.FloatRange(min=0, min_open=True),
            help="Seconds an MCP connection, tool listing or call may take (default 60).",
        ),
        click.option(
            "--mcp-max-output",
            type=click.IntRange(min=1),
            help="Characters of an MCP tool's output a run keeps; more is an error "
            "(default 1048576).",
        ),
        click.option(
            "--keys-file",
            type=click.Path(dir_okay=False),
            help="API keys file (see `tether keys`); every request then needs a "
            "key, and responses belong to the key's tenant.",
        ),
        click.option(
            "--allow-anonymous/--no-allow-anonymous",
            default=None,
            help="Serve beyond loopback without API keys.",
        ),
        click.option(
            "--debug-routes/--no-debug-routes",
            default=None,
            help="Expose /debug/engine/{id} (scripted engine traces).",
        ),
        click.option("--log-level", help="Log level (default warning)."),
        click.option(
            "--log-format",
            type=click.Choice(["json", "text"]),
            help="Log lines as JSON objects (default) or plain text.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _settings(options: dict[str, Any]) -> Settings:
    options["upstream"] = list(options["upstream"]) or None
    options["mcp_hosts"] = list(options.get("mcp_hosts") or ()) or None
    try:
        settings = load_settings(**options)
        settings.all_upstreams()  # a bad --upstream flag fails here, not at startup
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return settings


def _run(settings: Settings, worker_only: bool) -> None:
    from tether.app import create_app
    from tether.auth import KeyRing, bind_is_safe
    from tether.logs import configure
    from tether.serving import protocol

    try:
        configure(settings.log_level, settings.log_format)
    except ValueError as exc:  # an unknown level name
        raise click.BadParameter(str(exc), param_hint="--log-level") from None
    keyring = KeyRing(_path(settings.keys_file), settings.api_keys)
    if not (worker_only or settings.allow_anonymous or bind_is_safe(settings.host, keyring)):
        raise click.UsageError(
            f"refusing to serve on {settings.host} without API keys (docs/contract.md §7): "
            "create keys with `tether keys create`, pass --keys-file, or --allow-anonymous"
        )
    try:
        app = create_app(settings, worker_only, keyring)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # httptools, with the header and body timeouts uvicorn lacks (tether.serving).
        http=protocol(settings.header_timeout, settings.body_timeout),
        log_level=settings.log_level,
        log_config=None,  # uvicorn's loggers go through ours (tether.logs), as JSON too
        access_log=False,  # tether.logs writes one access line per request instead
        timeout_graceful_shutdown=3,
    )


@main.command()
@click.option("--port", type=int, help="Port (default 8000).")
@_common
def serve(**options: Any) -> None:
    """Serve the Responses API. Flags override TETHER_* environment variables."""
    _run(_settings(options), worker_only=False)


@main.command()
@click.option(
    "--port",
    type=int,
    default=0,
    show_default=True,
    help="Port of the worker's /health (and debug) routes; 0 = any free port.",
)
@_common
def worker(**options: Any) -> None:
    """Run responses (no API), with others on the same --db postgresql:// and --redis."""
    _run(_settings(options), worker_only=True)


def _path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


KEYS_FILE = click.option(
    "--keys-file",
    type=click.Path(dir_okay=False),
    envvar="TETHER_KEYS_FILE",
    default="tether-keys.json",
    show_default=True,
    help="The API keys file.",
)


@main.group()
def keys() -> None:
    """Create, list and revoke API keys (the file stores only their hashes)."""


@keys.command("create")
@click.option("--tenant", required=True, help="The tenant the key's responses belong to.")
@click.option("--name", default="", help="A label for the key.")
@KEYS_FILE
def keys_create(tenant: str, name: str, keys_file: str) -> None:
    """Create a key and print its secret (shown only this once)."""
    from tether.auth import create_key

    try:
        key, secret = create_key(Path(keys_file), tenant, name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--tenant") from None
    click.echo(f"{key.id}  tenant={key.tenant}")
    click.echo(secret)


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@KEYS_FILE
def keys_list(keys_file: str, as_json: bool) -> None:
    """List keys (never their secrets)."""
    from tether.auth import describe, load_keys

    rows = [describe(k) for k in load_keys(Path(keys_file))]
    _table(rows, ["id", "tenant", "name", "created_at", "revoked_at"], as_json)


@keys.command("revoke")
@click.argument("key_id")
@KEYS_FILE
def keys_revoke(key_id: str, keys_file: str) -> None:
    """Revoke a key; a running server refuses it (401) from its next request."""
    from tether.auth import revoke_key

    try:
        key = revoke_key(Path(keys_file), key_id)
    except KeyError:
        raise click.BadParameter(f"no key {key_id!r} in {keys_file}", param_hint="KEY_ID") from None
    click.echo(f"revoked {key.id} (tenant {key.tenant})")


@main.command()
@click.option(
    "--db",
    envvar="TETHER_DB",
    default="tether.db",
    show_default=True,
    help="The server's database: a SQLite file or postgresql://...",
)
@click.option("--tenant", help="Only this tenant's rows.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
def usage(db: str, tenant: str | None, as_json: bool) -> None:
    """The usage ledger: tokens of terminal responses by tenant, API key, model and
    status (read from the database; the server may be running)."""
    import asyncio

    from tether.usage import read_ledger

    try:
        rows = asyncio.run(read_ledger(db, tenant))
    except Exception as exc:  # an unreachable or foreign database: say so, no traceback
        raise click.ClickException(f"cannot read the usage ledger from {db}: {exc}") from None
    counts = ["responses", "input_tokens", "output_tokens", "reasoning_tokens"]
    if not as_json and rows:
        # The table ends with the sums of its rows (JSON lines stay one row per line).
        total: dict[str, Any] = {"tenant": "total", "key_id": "", "model": "", "status": ""}
        rows = [*rows, total | {c: sum(r[c] for r in rows) for c in counts}]
    _table(rows, ["tenant", "key_id", "model", "status", *counts], as_json)


DB_OPTION = click.option(
    "--db",
    envvar="TETHER_DB",
    default="tether.db",
    show_default=True,
    help="The server's database: a SQLite file or postgresql://...",
)


@main.group()
def webhooks() -> None:
    """Webhook endpoints of tenants, and their deliveries (docs/webhooks.md)."""


def _admin(call: Any, db: str) -> Any:
    """Run a `webhook_admin` call; a database that cannot be reached is a message."""
    import asyncio

    try:
        return asyncio.run(call)
    except (ValueError, click.ClickException):
        raise
    except Exception as exc:
        raise click.ClickException(f"cannot use the database {db}: {exc}") from None


@webhooks.command("add")
@click.argument("url")
@click.option(
    "--events",
    required=True,
    help="Comma-separated: response.completed, response.failed, response.incomplete, "
    "response.cancelled.",
)
@click.option("--tenant", default="default", show_default=True, help="Whose responses.")
@click.option("--config", type=click.Path(dir_okay=False), help="TOML config file.")
@DB_OPTION
def webhooks_add(url: str, events: str, tenant: str, config: str | None, db: str) -> None:
    """Add an endpoint and print its signing secret (shown only this once)."""
    from tether import webhook_admin
    from tether.webhooks import TargetRefused

    allowed = load_settings(config).webhook_allowed_hosts
    try:
        endpoint = _admin(webhook_admin.add(db, url, events, tenant, allowed), db)
    except TargetRefused as exc:
        raise click.BadParameter(str(exc), param_hint="URL") from None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--events") from None
    click.echo(f"{endpoint.id}  tenant={endpoint.tenant}  {endpoint.url}")
    click.echo(endpoint.secret)


@webhooks.command("list")
@click.option("--tenant", help="Only this tenant's endpoints.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@DB_OPTION
def webhooks_list(tenant: str | None, as_json: bool, db: str) -> None:
    """List endpoints (a hint of each secret, never the secret)."""
    from tether import webhook_admin

    rows = _admin(webhook_admin.listing(db, tenant), db)
    _table(rows, ["id", "tenant", "url", "events", "secret", "created_at"], as_json)


@webhooks.command("remove")
@click.argument("endpoint_id")
@DB_OPTION
def webhooks_remove(endpoint_id: str, db: str) -> None:
    """Remove an endpoint; its pending deliveries are dropped."""
    from tether import webhook_admin

    if not _admin(webhook_admin.remove(db, endpoint_id), db):
        raise click.BadParameter(f"no endpoint {endpoint_id!r}", param_hint="ID")
    click.echo(f"removed {endpoint_id}")


@webhooks.command("rotate-secret")
@click.argument("endpoint_id")
@click.option(
    "--keep-old",
    is_flag=True,
    help="Sign with the old secret too for 24 hours (OpenAI's "
    "keep_old_secret_active_for_24_hours), while receivers switch.",
)
@DB_OPTION
def webhooks_rotate(endpoint_id: str, keep_old: bool, db: str) -> None:
    """Give an endpoint a new signing secret and print it (pending deliveries too are
    signed with it from their next attempt)."""
    from tether import webhook_admin

    secret = _admin(webhook_admin.rotate(db, endpoint_id, keep_old), db)
    if secret is None:
        raise click.BadParameter(f"no endpoint {endpoint_id!r}", param_hint="ID")
    click.echo(secret)


@webhooks.command("deliveries")
@click.option("--endpoint", "endpoint_id", help="Only this endpoint's deliveries.")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="JSON lines instead of a table.")
@DB_OPTION
def webhooks_deliveries(endpoint_id: str | None, limit: int, as_json: bool, db: str) -> None:
    """The newest deliveries: state (pending, delivered, gave_up), attempts, last result."""
    from tether import webhook_admin

    rows = _admin(webhook_admin.deliveries(db, endpoint_id, limit), db)
    _table(
        rows,
        [
            "id",
            "endpoint_id",
            "response_id",
            "type",
            "state",
            "attempts",
            "last_status",
            "last_error",
        ],
        as_json,
    )


def _table(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    cells = [[str(c) for c in columns]]
    cells += [["-" if r[c] is None else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


if __name__ == "__main__":
    main()
