"""QMP with a deadline on everything: connect, greeting, every command, disconnect.

A thin synchronous wrapper over ``qemu.qmp.QMPClient`` (the library's own async client), with
an event loop of its own per connection, so it works from any thread (callers serialise use of
one connection). A QEMU that stops answering (stopped by SIGSTOP, stuck in a long operation,
wedged) makes a call raise :class:`QMPTimeout` after ``timeout`` seconds instead of blocking its
caller, and any lock the caller holds, for ever. After a timeout or a broken connection the
connection is closed; the next call connects again.

:func:`cont` resumes a VM and checks with ``query-status`` that it runs, retrying a few times.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.qmp_client import ExecuteError

from harness.errors import QMPError

DEFAULT_TIMEOUT = 10.0


class QMPTimeout(QMPError):
    """QEMU did not answer a QMP request in time."""


class QMPConnection:
    """One QMP connection to a UNIX socket; every operation bounded by ``timeout`` seconds."""

    def __init__(self, path: str | Path, timeout: float = DEFAULT_TIMEOUT, name: str = "") -> None:
        self.path = str(path)
        self.timeout = timeout
        self.name = name or self.path
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: QMPClient | None = None

    def _run(self, coro: Any, what: str, timeout: float | None = None) -> Any:
        assert self._loop is not None
        t = self.timeout if timeout is None else timeout
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, t))
        except TimeoutError:
            self.close()
            raise QMPTimeout(f"{self.name}: QMP {what}: no answer in {t:g} s") from None
        except (KeyboardInterrupt, SystemExit):
            self.close()  # interrupted mid-exchange: the stream is out of step, start afresh
            raise

    def connect(self) -> None:
        """Connect and negotiate (no-op if connected)."""
        if self._client is not None:
            return
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(self.name)
        try:
            self._run(self._client.connect(self.path), "connect")
        except QMPError:
            raise
        except Exception as e:  # noqa: BLE001 - the library raises several types
            self.close()
            raise QMPError(f"{self.name}: cannot connect to QMP socket {self.path}: {e}") from None

    def cmd_raw(self, command: str, args: dict[str, Any] | None = None,
                timeout: float | None = None) -> dict[str, Any]:
        """Run one command; the reply as QMP sends it (``{"return": ...}`` or ``{"error": ...}``)."""
        self.connect()
        assert self._client is not None
        try:
            ret = self._run(self._client.execute(command, args), command, timeout)
        except ExecuteError as e:
            return {"error": dict(e.received.get("error", {}))}
        except QMPError:
            raise
        except Exception as e:  # noqa: BLE001 - connection lost, protocol error
            self.close()
            raise QMPError(f"{self.name}: QMP {command} failed: {e}") from None
        return {"return": ret}

    def cmd(self, command: str, timeout: float | None = None, **args: Any) -> Any:
        """Run one command; its ``return`` value, or :class:`QMPError` with QEMU's message."""
        reply = self.cmd_raw(command, args or None, timeout)
        if "error" in reply:
            raise QMPError(f"{self.name}: QMP {command}: {reply['error'].get('desc')}")
        return reply["return"]

    def close(self) -> None:
        """Disconnect (bounded too: a stopped QEMU cannot hold it)."""
        client, loop = self._client, self._loop
        self._client = self._loop = None
        if client is not None and loop is not None:
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.wait_for(client.disconnect(), 2.0))
        if loop is not None:
            with contextlib.suppress(Exception):
                loop.close()

    def __enter__(self) -> QMPConnection:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(sock: str | Path, timeout: float = DEFAULT_TIMEOUT, wait: float = 10.0,
            name: str = "") -> QMPConnection:
    """Connect to a QMP socket, waiting up to ``wait`` seconds for QEMU to create it."""
    deadline = time.monotonic() + wait
    last: Exception | None = None
    while True:
        if Path(sock).exists():
            q = QMPConnection(sock, timeout, name)
            try:
                q.connect()
                return q
            except QMPTimeout:
                raise
            except QMPError as e:
                last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    raise QMPError(f"cannot connect to QMP socket {sock}: {last or 'socket never appeared'}")


def cont(run: Any, name: str, tries: int = 3) -> None:
    """Resume a VM with ``cont`` and check with ``query-status`` that it runs; ``run(command)``
    runs one QMP command (:meth:`harness.vm.VM.qmp` or a :class:`QMPConnection`'s ``cmd``).
    Retries; raises :class:`QMPError` if the VM is still not running."""
    last: Exception | None = None
    for _ in range(tries):
        try:
            run("cont")
        except QMPError as e:
            last = e
        try:
            if run("query-status").get("running"):
                return
        except QMPError as e:
            last = e
        time.sleep(0.2)
    raise QMPError(f"VM {name} is still paused after {tries} 'cont': {last or 'query-status says paused'}")
