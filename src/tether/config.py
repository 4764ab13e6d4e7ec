"""Settings: command-line flags override `TETHER_*` environment variables, which override
a TOML config file (`--config`), which overrides the defaults."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class UpstreamConfig(BaseModel):
    """One upstream server and the model id tether serves through it."""

    model_config = ConfigDict(extra="forbid")

    model: str  # the model id tether's clients ask for
    url: str  # base URL, e.g. http://127.0.0.1:8080/v1
    kind: Literal["chat", "responses"] = "chat"
    upstream_model: str | None = None  # the model's name at the upstream (default: `model`)
    api_key_env: str | None = None  # environment variable holding the upstream's API key
    # `authorization` sends `Bearer KEY`; any other name sends the key as that header's
    # value (Azure OpenAI's `api-key`).
    api_key_header: str = "authorization"
    tokenizer: str | None = None  # a GGUF file whose tokenizer counts tokens (chat kind)
    # The model's context in tokens (chat kind): prompts that do not fit are refused
    # (or truncated, `truncation: "auto"`) before they are sent. Unset: not checked.
    context: int | None = Field(default=None, ge=1)
    concurrency: int = Field(default=64, ge=1)  # generations at once; more wait, queued
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=300.0, gt=0)  # longest silence between two chunks
    retries: int = Field(default=2, ge=0)  # only before the first token
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    # Chat kind: `<think>...</think>` inside `content` is the model's reasoning, for
    # servers that do not split it out (`reasoning_content`, `reasoning`, `thinking`).
    # `open`: the prompt's template already opened `<think>` (DeepSeek-R1 and its
    # distills), so the stream starts inside the thinking and only `</think>` comes.
    think_tags: bool | Literal["open"] = False
    # Chat kind: the field of an assistant message that gives the model its earlier
    # thinking back (reasoning items of the conversation): `reasoning_content` (vLLM,
    # llama.cpp), `reasoning` (Ollama's OpenAI-compatible API), `thinking`; `none` leaves
    # it out, for servers that refuse unknown message fields. Chat templates
    # decide whether the model sees it.
    reasoning_field: Literal["reasoning_content", "reasoning", "thinking", "none"] = (
        "reasoning_content"
    )

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


def parse_upstream(flag: str) -> UpstreamConfig:
    """`MODEL=[KIND+]URL[,option=value...]`, e.g.
    `gpt=responses+https://api.openai.com/v1,api_key_env=OPENAI_API_KEY`."""
    model, sep, rest = flag.partition("=")
    if not sep or not model or not rest:
        raise ValueError(f"--upstream {flag!r}: expected MODEL=URL")
    url, *options = rest.split(",")
    fields: dict[str, Any] = {"model": model}
    for prefix in ("chat+", "responses+"):
        if url.startswith(prefix):
            fields["kind"], url = prefix[:-1], url[len(prefix) :]
    fields["url"] = url
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise ValueError(f"--upstream {flag!r}: option {option!r} is not KEY=VALUE")
        fields[key.replace("-", "_")] = value
    return UpstreamConfig.model_validate(fields)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TETHER_")

    host: str = "127.0.0.1"
    port: int = 8000
    db: str = "tether.db"  # a SQLite file, or postgresql://... (scaled out, with `redis`)
    # A streaming replica of the PostgreSQL `db` that replays finished logs (store/pg_replica.py).
    db_read: str | None = None
    # Scale-out: Redis for the run queue, live event streams and cancel signals.
    redis: str | None = None
    redis_prefix: str = "tether"  # key prefix, so deployments can share one Redis
    # Runs this process executes at once: None = what the engine allows; 0 = API only.
    workers: int | None = Field(default=None, ge=0)
    # None: `local`, or `none` when upstreams are configured.
    engine: Literal["local", "scripted", "none"] | None = None
    scripted_rate: float = 100.0  # tokens per second; 0 = as fast as possible
    scripted_length: int = 200
    upstream: list[str] = []  # `--upstream MODEL=URL` flags (see parse_upstream)
    upstreams: list[UpstreamConfig] = []  # `[[upstreams]]` tables of the config file
    cancel_timeout: float = 2.0  # docs/contract.md §3.2: bound before a run is fenced out
    lease_timeout: float = 30.0  # docs/contract.md §6.2
    # Completion windows (tether.schedule): a `2h`/`8h` response starts at the latest
    # this many seconds before its window ends, kept for the run itself.
    window_reserve: float = Field(default=1800.0, ge=0)
    # Run slots deferred (`2h`/`8h`) responses may hold at once; None: half of them.
    deferred_slots: int | None = Field(default=None, ge=1)
    keepalive: float = 15.0  # docs/contract.md §4.2
    retention: float = 24 * 3600.0  # docs/contract.md §4.5
    websocket_limit: float = 3600.0  # seconds a WebSocket connection lives (the spec: 60 min)
    max_body_bytes: int = 4 * 1024 * 1024
    # Hosted tools tether cannot run (web_search, file_search, ...): `refuse` (400 naming
    # `tools[i].type`) or `drop` (left out, noted in the response; docs/fields.md).
    hosted_tools: Literal["refuse", "drop"] = "refuse"
    # MCP tools (docs/fields.md, "Tools"): the hosts of the MCP servers a run may call
    # (`loopback`: any loopback address; `*`: any host), the seconds one call (or one
    # listing) may take, and the characters of a tool's output kept (more: an error).
    mcp_hosts: list[str] = ["loopback"]
    mcp_timeout: float = Field(default=60.0, gt=0)
    mcp_max_output: int = Field(default=1024 * 1024, gt=0)
    # Slow clients (tether.serving): seconds a request's headers, then its body, may take
    # to arrive before the connection is closed (408).
    header_timeout: float = Field(default=10.0, gt=0)
    body_timeout: float = Field(default=60.0, gt=0)
    # Event logs kept in memory for fast readers (store/logcache.py); beyond it, from the
    # database. 64 MiB suits a small machine; 0: every read goes to the database.
    log_cache_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    # API keys (docs/contract.md §7): a JSON file of hashed keys (`tether keys`), and/or
    # `TETHER_API_KEYS="tenant:secret,..."`. Neither: one tenant, loopback only.
    keys_file: str | None = None
    api_keys: str | None = None
    allow_anonymous: bool = False  # serve beyond loopback without keys (you were warned)
    debug_routes: bool = False  # expose the scripted engine's trace (tests, benchmarks)
    # Webhooks (docs/webhooks.md). The outbox is always written; `webhook_sender` says
    # whether this process also delivers it (any number of processes may).
    webhook_sender: bool = True
    webhook_timeout: float = Field(default=10.0, gt=0)  # seconds one attempt may take
    webhook_concurrency: int = Field(default=4, ge=1)  # attempts at once per endpoint
    webhook_poll: float = Field(default=0.5, gt=0)  # seconds between looks for due ones
    webhook_retry_first: float = Field(default=10.0, gt=0)  # delay before the 1st retry
    webhook_retry_max_delay: float = Field(default=6 * 3600.0, gt=0)  # the doubling stops
    webhook_retry_window: float = Field(default=72 * 3600.0, gt=0)  # then it gives up
    # Hosts (besides loopback) webhooks may be sent to: no SSRF through an endpoint URL.
    webhook_allowed_hosts: list[str] = []
    log_level: str = "warning"
    log_format: Literal["json", "text"] = "json"

    def all_upstreams(self) -> list[UpstreamConfig]:
        """The config file's upstreams, then the flags'; a later one for the same model
        id replaces an earlier one (a flag overrides the file)."""
        by_model = {u.model: u for u in self.upstreams}
        for flag in self.upstream:
            spec = parse_upstream(flag)
            by_model[spec.model] = spec
        return list(by_model.values())

    def engine_kind(self) -> str:
        if self.engine is not None:
            return self.engine
        return "none" if (self.upstream or self.upstreams) else "local"


def load_settings(config: str | None = None, **flags: Any) -> Settings:
    """Settings from flags (non-None values), `TETHER_*` env, then the TOML file named by
    `config` or `TETHER_CONFIG`."""
    flags = {k: v for k, v in flags.items() if v is not None}
    path = config or os.environ.get("TETHER_CONFIG")
    if not path:
        return Settings(**flags)
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist")

    class FileSettings(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (
                init_settings,
                env_settings,
                TomlConfigSettingsSource(settings_cls, toml_file=path),
            )

    return FileSettings(**flags)
