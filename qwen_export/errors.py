"""Error types. Every error carries a one-line message that says what was expected, what was found
and what to do; the CLI prints ``error: <message>`` and exits nonzero."""

from __future__ import annotations


class QwenExportError(Exception):
    """Base class of every error this package raises on purpose (bad input, bad artifact, ...)."""

    exit_code = 2

    def __str__(self) -> str:  # keep messages on one line for the CLI
        return " ".join(super().__str__().split())


class ConfigError(QwenExportError):
    """config.json is missing, malformed, inconsistent or of an unsupported architecture."""


class CheckpointError(QwenExportError):
    """A checkpoint file is missing, truncated, or holds a tensor of the wrong name/shape/dtype."""


class ArtifactError(QwenExportError):
    """An exported artifact is missing files, was modified, or has an unknown manifest schema."""


class OptionError(QwenExportError):
    """An option value is invalid (unknown enum value, negative length, bad sampling parameter)."""


class GenerationError(QwenExportError):
    """Generation cannot proceed (prompt over the context, token id out of range, ...)."""


class ContextLengthError(GenerationError):
    """The prompt does not fit the artifact's context (leaving room for one new token)."""


class MissingDependencyError(QwenExportError):
    """An optional dependency (one of the package's extras) is not installed."""


class EngineUnavailableError(QwenExportError):
    """The engine SDK a target needs is not installed."""
