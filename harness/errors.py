"""The one exception family of the harness.

The CLI catches :class:`HarnessError`, prints its message and ``context`` (console tail,
command line, QMP reply, config line) without a traceback, and exits non-zero.
"""

from __future__ import annotations


class HarnessError(Exception):
    """Base of every error the harness raises on purpose."""

    def __init__(self, message: str, context: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def __str__(self) -> str:
        if self.context:
            return f"{self.message}\n{self.context}"
        return self.message


class ToolMissing(HarnessError):
    """A host binary or package the harness needs is not installed."""


class ImageError(HarnessError):
    """The guest image could not be built or is incomplete."""


class BootError(HarnessError):
    """A VM did not start or did not become reachable."""


class QMPError(HarnessError):
    """A QMP command failed."""


class SSHError(HarnessError):
    """An SSH command to a guest failed."""


class ConfigError(HarnessError):
    """An experiment config is invalid."""


class AgentError(HarnessError):
    """The merge agent inside QEMU could not be built, reached or answered an error."""
