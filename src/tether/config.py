"""Settings: command-line flags override `TETHER_*` environment variables."""

from __future__ import annotations

from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TETHER_")

    host: str = "127.0.0.1"
    port: int = 8000
    db: str = "tether.db"
    engine: Literal["local", "scripted"] = "local"
    scripted_rate: float = 100.0  # tokens per second; 0 = as fast as possible
    scripted_length: int = 200
    cancel_timeout: float = 2.0  # CONTRACT §3.2: bound before a run is fenced out
    lease_timeout: float = 30.0  # CONTRACT §6.2
    keepalive: float = 15.0  # CONTRACT §4.2
    retention: float = 24 * 3600.0  # CONTRACT §4.5
    max_body_bytes: int = 4 * 1024 * 1024
    debug_routes: bool = False  # expose the scripted engine's trace (tests, benchmarks)
    log_level: str = "warning"
