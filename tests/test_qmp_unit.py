"""QMP deadlines and a verified ``cont`` (issue 8.5), against a UNIX socket server standing in
for a QEMU monitor that stops answering (pure protocol logic: no QEMU needed; the real QEMU
stopped with SIGSTOP is in test_hardening.py)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from harness import qmp
from harness.errors import QMPError

GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""},
                    "capabilities": []}}


class Monitor(threading.Thread):
    """Greets (unless ``greet`` is False), answers ``qmp_capabilities`` and then the commands
    in ``answers`` (a reply dict, or None: never answer that one and everything after it)."""

    def __init__(self, path: str, answers: list, greet: bool = True) -> None:
        super().__init__(daemon=True)
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        self.answers = answers
        self.greet = greet
        self.seen: list[str] = []
        self.conns: list[socket.socket] = []

    def run(self) -> None:
        while True:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        if not self.greet:
            return
        try:
            c.sendall(json.dumps(GREETING).encode() + b"\r\n")
            self._answer(c)
        except OSError:
            pass  # the client went away (it gave up on a stalled command)

    def _answer(self, c: socket.socket) -> None:
        dec, buf = json.JSONDecoder(), ""
        while data := c.recv(4096):
            buf += data.decode()
            while buf.strip():
                try:
                    req, n = dec.raw_decode(buf.lstrip())
                except ValueError:
                    break  # a partial message: read on (QMP messages end with no newline)
                buf = buf.lstrip()[n:]
                cmd = req["execute"]
                self.seen.append(cmd)
                if cmd == "qmp_capabilities":
                    reply = {"return": {}}
                elif not self.answers or self.answers[0] is None:
                    continue  # stalled: read on, answer nothing
                else:
                    reply = self.answers.pop(0)
                if "id" in req:
                    reply = reply | {"id": req["id"]}
                c.sendall(json.dumps(reply).encode() + b"\r\n")

    def close(self) -> None:
        self.srv.close()
        for c in self.conns:
            c.close()


def _bounded(fn, limit: float = 20.0):
    """Run ``fn`` in a thread: it must end (return or raise) within ``limit`` seconds."""
    out: dict = {}

    def go() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), "the QMP call blocked (no deadline)"
    return out


def test_a_stalled_monitor_times_out_and_the_connection_is_dropped(tmp_path):
    path = str(tmp_path / "qmp.sock")
    mon = Monitor(path, [{"return": {"running": True, "status": "running"}}, None])
    mon.start()
    try:
        q = qmp.connect(path, timeout=1.0, wait=2.0, name="VM t")
        assert q.cmd("query-status")["running"] is True
        t0 = time.monotonic()
        out = _bounded(lambda: q.cmd("stop"))
        assert isinstance(out.get("error"), qmp.QMPTimeout), out
        assert "VM t" in str(out["error"]) and "no answer" in str(out["error"])
        assert time.monotonic() - t0 < 10
        assert q._client is None  # closed: a late reply can never be read as the next one's
        q.close()
    finally:
        mon.close()


def test_a_monitor_that_never_greets_times_out_on_connect(tmp_path):
    path = str(tmp_path / "qmp.sock")
    mon = Monitor(path, [], greet=False)
    mon.start()
    try:
        out = _bounded(lambda: qmp.connect(path, timeout=1.0, wait=1.0))
        assert isinstance(out.get("error"), QMPError), out
    finally:
        mon.close()


class FakeVM:
    """``run(command)`` of a VM whose ``cont`` takes effect only after ``ignore`` tries, or
    fails with a QMP error ``fail`` times first."""

    def __init__(self, ignore: int = 0, fail: int = 0) -> None:
        self.ignore, self.fail = ignore, fail
        self.running = False
        self.calls: list[str] = []

    def __call__(self, command: str):
        self.calls.append(command)
        if command == "cont":
            if self.fail:
                self.fail -= 1
                raise QMPError("VM f: QMP cont: no answer")
            if self.ignore:
                self.ignore -= 1
            else:
                self.running = True
            return {}
        assert command == "query-status"
        return {"running": self.running, "status": "running" if self.running else "paused"}


def test_cont_is_checked_with_query_status_and_retried():
    vm = FakeVM(ignore=1)
    qmp.cont(vm, "f")
    assert vm.running and vm.calls == ["cont", "query-status", "cont", "query-status"]
    vm = FakeVM(fail=2)
    qmp.cont(vm, "f")
    assert vm.running and vm.calls.count("cont") == 3


def test_cont_that_never_takes_effect_is_an_error_naming_the_vm():
    vm = FakeVM(ignore=99)
    with pytest.raises(QMPError, match="VM f is still paused after 3 'cont'"):
        qmp.cont(vm, "f")
    assert vm.calls.count("query-status") == 3
