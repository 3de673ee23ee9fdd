"""The agent's exception hierarchy: every error it raises on purpose is an AgentError."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises deliberately."""


class ConfigError(AgentError):
    """The configuration is malformed; `errors` holds one "path: message" line per problem."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("invalid configuration:\n  " + "\n  ".join(errors))


class SourceError(AgentError):
    """A frame source could not be opened or read."""


class ModelError(AgentError):
    """A model file is unreadable or does not fit the expected input / output contract."""


class EngineError(AgentError):
    """An inference engine could not be built, loaded or run."""


class CacheError(AgentError):
    """The engine cache is unusable (not writable, corrupt entry, lock trouble)."""


class UpdateError(AgentError):
    """A model update was rejected or failed; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
