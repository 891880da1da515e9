"""engine_priority realtime (harness/sharing/priority.py) on real threads of a real process:
the merge agents' threads are found by name and only they are raised; the engine raises its own
thread; a host without RT throttling is refused. (The option end to end, with QEMU's agents:
tests/test_experiment.py's quick run.)"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.sharing import priority

# a process with threads named as agent.c names its own, and one that is not an agent's
CHILD = r"""
import ctypes, sys, threading, time
libc = ctypes.CDLL(None)
def named(name):
    libc.prctl(15, ctypes.c_char_p(name.encode()), 0, 0, 0)  # PR_SET_NAME: this thread's comm
    time.sleep(60)
for n in ("satori-agent", "satori-uffd", "qemu-vcpu"):
    threading.Thread(target=named, args=(n,), daemon=True).start()
time.sleep(0.3)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def child():
    p = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        yield p.pid
    finally:
        p.kill()
        p.wait()


def _comm(pid: int, tid: int) -> str:
    return Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()


def test_only_the_agents_threads_are_raised(child):
    tids = priority.agent_threads(child)
    assert sorted(_comm(child, t) for t in tids) == ["satori-agent", "satori-uffd"]
    assert priority.make_agents_realtime([child]) == {child: 2}
    for t in os.listdir(f"/proc/{child}/task"):
        want = os.SCHED_RR if int(t) in tids else os.SCHED_OTHER
        assert os.sched_getscheduler(int(t)) == want, _comm(child, int(t))
        if int(t) in tids:
            assert os.sched_getparam(int(t)).sched_priority == priority.RT_PRIORITY


def test_a_process_gone_has_no_agent_threads():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert priority.agent_threads(p.pid) == []
    assert priority.make_agents_realtime([p.pid]) == {p.pid: 0}


def test_the_engine_raises_its_own_thread_only():
    seen = {}

    def engine():
        priority.make_realtime()
        seen["policy"] = os.sched_getscheduler(0)

    t = threading.Thread(target=engine)
    t.start()
    t.join()
    assert seen["policy"] == os.SCHED_RR
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the calling (main) thread is untouched


def test_refused_where_the_kernel_does_not_throttle_rt(tmp_path):
    f = tmp_path / "sched_rt_runtime_us"
    f.write_text("-1\n")
    with pytest.raises(HarnessError, match="RT throttling off"):
        priority.check_throttled(f)
    f.write_text("950000\n")
    priority.check_throttled(f)
    with pytest.raises(HarnessError, match="cannot read"):
        priority.check_throttled(tmp_path / "missing")
    priority.check_throttled()  # this host throttles (the default 950000 of every 1000000 us)


def test_the_config_takes_normal_or_realtime_only():
    from harness import config
    from harness.errors import ConfigError

    base = {"name": "x", "vms": {"count": 2}, "modes": ["satori"], "sharing_domains": {"d": ["vm1", "vm2"]},
            "workloads": [{"name": "identical-readers"}]}
    assert config.validate(base, host_mem_mb=4096).engine_priority == "normal"
    assert config.validate({**base, "engine_priority": "realtime"}, host_mem_mb=4096).engine_priority == "realtime"
    with pytest.raises(ConfigError, match="engine_priority"):
        config.validate({**base, "engine_priority": "fifo"}, host_mem_mb=4096)
