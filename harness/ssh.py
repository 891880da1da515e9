"""SSH into a guest (paramiko): wait for sshd, run commands, copy bytes in and out.

QEMU's user networking accepts a TCP connection on the forwarded port before the guest's sshd
listens, and then holds it open, so a plain paramiko retry loop can hang. :func:`wait_banner`
therefore first polls the port until the peer really sends an ``SSH-`` banner; only then does
paramiko connect.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import paramiko

from harness.errors import SSHError

# paramiko's transport thread logs each failed try with a traceback, which Python's last-resort
# handler prints to stderr; the retries below say what failed, once, as an SSHError
logging.getLogger("paramiko").addHandler(logging.NullHandler())


@dataclasses.dataclass(frozen=True)
class Result:
    """The outcome of one command in the guest."""

    command: str
    rc: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0


PATIENT_AFTER_S = 30.0  # a boot slower than this is a loaded host: give sshd longer per try


def wait_banner(
    port: int,
    timeout: float,
    host: str = "127.0.0.1",
    alive: Callable[[], bool] | None = None,
) -> float:
    """Poll ``host:port`` until an ``SSH-`` banner arrives. Returns seconds waited.

    ``alive`` is called between tries; when it returns False the wait stops early (the VM died).
    Each try waits 2 s for the banner (slirp may hold a connection while the guest is not up
    yet: a short try then finds the guest soon after it is). After :data:`PATIENT_AFTER_S` the
    wait per try grows (x1.5, up to 30 s): on a loaded host a guest's sshd can take longer than
    2 s per connection, and dropping each try after 2 s piled unauthenticated connections up in
    the guest until its sshd refused every new one ("Exceeded MaxStartups") and the boot failed.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    per_try = 2.0
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise SSHError("the VM exited while waiting for sshd")
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                s.settimeout(max(0.1, min(per_try, deadline - time.monotonic())))
                data = s.recv(64)
                if data.startswith(b"SSH-"):
                    return time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 >= PATIENT_AFTER_S:
            per_try = min(30.0, per_try * 1.5)
        time.sleep(0.2)
    raise SSHError(f"no SSH banner on {host}:{port} after {timeout:.0f} s")


class SSH:
    """One paramiko connection to a guest's root account, key-based."""

    def __init__(self, port: int, key: Path, host: str = "127.0.0.1", user: str = "root") -> None:
        self.host = host
        self.port = port
        self.user = user
        self.key = key
        self._client: paramiko.SSHClient | None = None

    def connect(self, timeout: float = 30.0) -> None:
        pkey = paramiko.Ed25519Key.from_private_key_file(str(self.key))
        last: Exception | None = None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                client.connect(
                    self.host, port=self.port, username=self.user, pkey=pkey,
                    allow_agent=False, look_for_keys=False, timeout=10, banner_timeout=10,
                    auth_timeout=10,
                )
                transport = client.get_transport()
                if transport is not None:
                    transport.set_keepalive(15)
                self._client = client
                return
            except (paramiko.SSHException, OSError) as e:
                last = e
                client.close()
                time.sleep(0.5)
        raise SSHError(f"SSH to {self.user}@{self.host}:{self.port} failed: {last}")

    @property
    def client(self) -> paramiko.SSHClient:
        if self._client is None:
            self.connect()
        assert self._client is not None
        return self._client

    def run(self, command: str, timeout: float | None = 600.0, stdin: bytes | None = None) -> Result:
        """Run ``command`` in the guest shell; never raises on a non-zero exit (see :meth:`check`)."""
        t0 = time.monotonic()
        try:
            chan_in, chan_out, chan_err = self.client.exec_command(command, timeout=timeout)
            if stdin is not None:
                chan_in.write(stdin)
                chan_in.flush()
                chan_in.channel.shutdown_write()
            out = chan_out.read().decode(errors="replace")
            err = chan_err.read().decode(errors="replace")
            rc = chan_out.channel.recv_exit_status()
        except (paramiko.SSHException, OSError, TimeoutError) as e:
            raise SSHError(f"SSH command failed: {command!r}: {e or type(e).__name__}") from None
        return Result(command, rc, out, err, time.monotonic() - t0)

    def check(self, command: str, timeout: float | None = 600.0, stdin: bytes | None = None) -> str:
        """Run ``command``; return its stdout, raise :class:`SSHError` on a non-zero exit."""
        r = self.run(command, timeout=timeout, stdin=stdin)
        if r.rc != 0:
            raise SSHError(
                f"guest command exited {r.rc}: {command}",
                context=(r.stdout[-1500:] + r.stderr[-1500:]).strip() or None,
            )
        return r.stdout

    def put(self, data: bytes, path: str) -> None:
        """Write ``data`` to ``path`` in the guest."""
        self.check(f"cat > {path}", stdin=data)

    def get(self, path: str) -> bytes:
        chan_in, chan_out, _ = self.client.exec_command(f"cat {path}")
        data = chan_out.read()
        if chan_out.channel.recv_exit_status() != 0:
            raise SSHError(f"cannot read {path} in the guest")
        return data

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
