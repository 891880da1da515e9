"""wait_banner against a local stand-in for a slow guest sshd (pure logic: no QEMU)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from harness import ssh
from harness.errors import SSHError


def _slow_sshd(delay: float) -> tuple[int, list[float], threading.Event]:
    """A listener that sends an SSH banner ``delay`` s after each connection (a loaded guest)."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    seen: list[float] = []
    stop = threading.Event()

    def serve_one(c: socket.socket) -> None:
        with c:
            time.sleep(delay)
            try:
                c.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            except OSError:
                pass

    def serve() -> None:
        with srv:
            while not stop.is_set():
                try:
                    c, _ = srv.accept()
                except TimeoutError:
                    continue
                seen.append(time.monotonic())
                threading.Thread(target=serve_one, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1], seen, stop


def test_a_slow_sshd_is_waited_for_not_flooded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ssh, "PATIENT_AFTER_S", 0.0, raising=False)
    port, seen, stop = _slow_sshd(2.5)  # slower than the 2 s first try
    try:
        waited = ssh.wait_banner(port, timeout=20)
    finally:
        stop.set()
    assert 2.5 <= waited < 10
    assert len(seen) <= 3  # a few tries, not a connection every 2 s until sshd gives up


def test_no_banner_is_an_error() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    srv.close()  # nothing listens
    with pytest.raises(SSHError, match="no SSH banner"):
        ssh.wait_banner(port, timeout=1.0)
    with pytest.raises(SSHError, match="exited"):
        ssh.wait_banner(port, timeout=5.0, alive=lambda: False)
