"""tether: a self-hosted OpenAI Responses API server where cancel means stop."""

__version__ = "0.1.0"
