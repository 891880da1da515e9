"""Hardening with real guests (issue 8): two background VMs with sharing, as a user runs them.

- every file a run makes is private, and an unprivileged user (``runuser -u nobody``) cannot read
  guest RAM, the content store or anything under the runtime folder; nothing is in /dev/shm;
- the sharing engine (``satori share``, its own process) is SIGKILLed in the middle of a batch
  (a VM paused by QMP ``stop``, no ``cont`` yet); ``satori cleanup`` resumes it, restores
  ``vm.max_map_count`` and removes the engine's status file; the guests' data is right;
- a QEMU stopped with SIGSTOP (QMP stalled): ``vm ls`` and ``vm down`` do not hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sigint_default

from harness import sysstate
from harness.memfd import fd_name
from harness.qmp import QMPTimeout
from harness.vm import VM, VMSpec, find_state, harness_leftovers, qmp_connect, state_paths

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
FILES = "/data/set1/f00[0-2]?.bin"  # 30 x 4 MiB
NAMES = ("hza", "hzb")


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


def ssh(name: str, command: str) -> str:
    for _ in range(3):  # 255: the ssh connection itself failed (a loaded guest), not the command
        r = cli("vm", "ssh", name, "--", command, timeout=300)
        if r.returncode != 255:
            break
        time.sleep(2)
    assert r.returncode == 0, f"rc {r.returncode}: {r.stderr}"
    return r.stdout


def run_state(name: str) -> bool:
    r = cli("vm", "qmp", name, "query-status")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["running"]


@pytest.fixture(scope="module")
def pair(image):
    if not image.hints:
        pytest.fail("the image has no hint ring")
    before = set(harness_leftovers())
    # hzb's agent merges with the vCPUs held (SATORI_AGENT_WP=0, read when its QEMU starts):
    # the engine then pauses it per batch, and a kill can fall between QMP stop and cont
    ups = [subprocess.Popen([sys.executable, "-m", "harness.cli", "vm", "up", n, "--sharing",
                             "--memory", "384"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ | ({"SATORI_AGENT_WP": "0"} if n == "hzb" else {}))
           for n in NAMES]
    try:
        for p in ups:
            out, err = p.communicate(timeout=600)
            assert p.returncode == 0, out + err
        yield NAMES
    finally:
        for p in ups:
            if p.poll() is None:
                p.kill()
                p.wait()
        cli("vm", "down", *NAMES)
    left = [x for x in harness_leftovers() if x not in before]
    assert not left, f"left behind: {left}"


def _private_everywhere(root: Path) -> list[str]:
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [dirpath, *[os.path.join(dirpath, f) for f in filenames + dirnames]]:
            st = os.lstat(n)
            if st.st_mode & 0o077 or st.st_uid != os.geteuid():
                bad.append(f"{n}: mode {st.st_mode & 0o7777:o} uid {st.st_uid}")
    return bad


def _nobody_reads(path: str) -> bool:
    r = subprocess.run(["runuser", "-u", "nobody", "--", "head", "-c", "1", path], capture_output=True)
    return r.returncode == 0


def test_files_are_private_and_nobody_reads_guest_memory(pair, tmp_path):
    runtime = Path(os.environ["SATORI_RUNTIME"])
    eng = subprocess.Popen([sys.executable, "-m", "harness.cli", "share", *pair, "--domain", "hz"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           preexec_fn=sigint_default)
    try:
        status = runtime / "share-hz.json"
        deadline = time.monotonic() + 120
        while not status.exists() and time.monotonic() < deadline and eng.poll() is None:
            time.sleep(0.2)
        assert status.exists(), eng.stdout.read() if eng.poll() is not None else "no status file"
        assert _private_everywhere(runtime) == []
        assert _private_everywhere(sysstate.system_dir()) == []
        regular = [os.path.join(d, f) for d, _, fs in os.walk(runtime) for f in fs
                   if Path(d, f).is_file()]
        assert any(f.endswith("state.json") for f in regular) and status in map(Path, regular)
        assert not [f for f in regular if _nobody_reads(f)]
        # guest RAM, hint rings and the store: memfds, reachable only through /proc/<pid>/fd
        holders = [find_state(n)["pid"] for n in pair] + [eng.pid]
        mem = [f"/proc/{pid}/fd/{fd}" for pid in holders for fd in os.listdir(f"/proc/{pid}/fd")
               if (fd_name(int(fd), pid) or "").startswith("satori-")]
        assert len(mem) >= 5, mem  # 2 x (RAM, ring) in QEMUs + the store in the engine
        assert all(os.path.exists(p) for p in mem)
        assert not [p for p in mem if _nobody_reads(p)]
        assert not [p for p in os.listdir("/dev/shm") if any(n in p for n in pair)]
    finally:
        eng.send_signal(signal.SIGINT)
        eng.wait(60)


def test_engine_killed_mid_batch_then_cleanup(pair):
    a, b = pair
    expect = ssh(a, f"md5sum {FILES}")
    assert ssh(b, f"md5sum {FILES}") == expect
    for n in pair:
        ssh(n, "sync; echo 3 > /proc/sys/vm/drop_caches")
    eng = subprocess.Popen([sys.executable, "-m", "harness.cli", "share", a, b, "--domain", "hk",
                            "--batch", "512"], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    markers = [state_paths(find_state(n)).work / "paused-by.json" for n in pair]
    watch = {n: qmp_connect(state_paths(find_state(n)).qmp_manual) for n in pair}
    readers = [subprocess.Popen([sys.executable, "-m", "harness.cli", "vm", "ssh", n, "--",
                                 f"cat {FILES} > /dev/null"], cwd=ROOT, stdout=subprocess.DEVNULL)
               for n in pair]
    paused = None
    mmc = None
    try:
        deadline = time.monotonic() + 300
        while paused is None and time.monotonic() < deadline and eng.poll() is None:
            rec = sysstate.system_dir() / "max_map_count.json"
            if mmc is None and rec.exists():
                mmc = json.loads(rec.read_text())
            hit = [n for n in pair if not watch[n].cmd("query-status")["running"]]
            if not hit:
                continue
            os.kill(eng.pid, signal.SIGSTOP)  # frozen between QMP 'stop' and 'cont'?
            time.sleep(0.5)
            still = [n for n in hit if not watch[n].cmd("query-status")["running"]]
            if still:
                paused = still[0]
                os.kill(eng.pid, signal.SIGKILL)
            else:
                os.kill(eng.pid, signal.SIGCONT)
    finally:
        for q in watch.values():
            q.close()
        if eng.poll() is None and paused is None:
            eng.kill()
        eng.wait(30)
        if paused is None:  # no VM left paused: the readers end on their own
            _reap(readers)
    assert paused is not None, "never caught the engine between QMP stop and cont"
    assert not run_state(paused)  # the kill left it paused
    ls = cli("vm", "ls")  # what QMP says, not only "the pid is alive"
    assert [ln.split()[1] for ln in ls.stdout.splitlines() if ln.split()[:1] == [paused]] == ["paused"], ls.stdout
    r = cli("cleanup")
    assert r.returncode == 0, r.stderr
    assert f"VM {paused}: resumed" in r.stdout, r.stdout
    assert "share-hk.json" in r.stdout
    assert run_state(a) and run_state(b)
    _reap(readers)  # the paused guest's reader ends once it runs again
    # merged pages (and the rest) read right, before and after dropping the page cache
    assert ssh(a, f"md5sum {FILES}") == expect
    assert ssh(b, f"md5sum {FILES}") == expect
    assert ssh(a, f"echo 3 > /proc/sys/vm/drop_caches; md5sum {FILES}") == expect
    # vm.max_map_count: the dead engine holds it no more (restored if nobody else needs it)
    rec = sysstate.system_dir() / "max_map_count.json"
    if rec.exists():
        assert eng.pid not in [h["pid"] for h in json.loads(rec.read_text())["holders"]]
    elif mmc is not None:  # restored (or already back); a non-harness process may change it later
        assert "vm.max_map_count" in r.stdout or int(sysstate.MAX_MAP_COUNT.read_text()) == mmc["original"]
    assert not (Path(os.environ["SATORI_RUNTIME"]) / "share-hk.json").exists()
    assert not [m for m in markers if m.exists()]
    again = cli("cleanup")
    assert "resumed" not in again.stdout and "share-" not in again.stdout


def _reap(procs: list[subprocess.Popen], timeout: float = 300) -> None:
    try:
        for p in procs:
            p.wait(timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_stalled_qmp_does_not_hang_ls_or_down(pair):
    _, b = pair
    pid = find_state(b)["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        r = cli("vm", "ls", timeout=120)  # a hang would time out here
        assert r.returncode == 0 and "no answer" in r.stdout, r.stdout
        r = cli("vm", "down", b, timeout=120)
        assert r.returncode == 0, r.stderr
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGCONT)
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_foreground_vm_with_stalled_qmp_shuts_down(image):
    vm = VM(VMSpec("hzfg", memory_mb=256), image)
    vm.launch()  # no need to wait for the guest: QEMU and its monitor are what matter
    try:
        assert vm.qmp("query-status") is not None
        os.kill(vm.pid, signal.SIGSTOP)
        with pytest.raises(QMPTimeout):
            vm.qmp("query-status", timeout=2.0)
        with pytest.raises(QMPTimeout):
            vm.qmp("cont", timeout=2.0)
    finally:
        vm.shutdown(timeout=5)  # quit times out, SIGTERM waits, SIGKILL ends it
    assert vm.proc.poll() is not None


KILLED_RUN = """
name: killed
vms:
  count: 2
  memory_mb: 256
sharing_domains:
  kd: [vm1, vm2]
modes: [satori+ksm]
workloads:
  - name: identical-readers
    params: {files: 5, keep_s: 600}
sample_interval_s: 1
repetitions: 1
seed: 1
"""


@pytest.mark.skipif(not Path("/sys/kernel/mm/ksm/run").exists(), reason="host kernel without KSM")
def test_killed_run_is_undone_by_the_next_start(image, tmp_path):
    """``satori run`` (KSM set, vm.max_map_count raised by its engine, two QEMUs) is SIGKILLed:
    its QEMUs end with it, and the next start (here ``satori share``, which then fails on its
    argument) puts KSM and vm.max_map_count back from the saved state and says so; a second
    ``satori cleanup`` finds nothing left."""
    from harness.ksm import KSM_SYSFS

    cfg = tmp_path / "killed.yaml"
    cfg.write_text(KILLED_RUN)
    run = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(cfg), "--out", str(tmp_path / "out")],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sysd = sysstate.system_dir()

    def holds() -> tuple[bool, bool]:
        ksm_saved = sysd / "ksm-saved.json"
        mmc = sysd / "max_map_count.json"
        try:
            k = ksm_saved.exists() and json.loads(ksm_saved.read_text())["pid"] == run.pid
            m = mmc.exists() and run.pid in [h["pid"] for h in json.loads(mmc.read_text())["holders"]]
        except (OSError, ValueError, KeyError):
            return False, False
        return k, m

    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and run.poll() is None and holds() != (True, True):
            time.sleep(0.5)
        assert holds() == (True, True), (run.poll(), run.stdout.read() if run.poll() is not None else "")
        mmc_before = json.loads((sysd / "max_map_count.json").read_text())["original"]
        qemus = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == run.pid
                 and "qemu" in os.path.basename(os.readlink(f"/proc/{p}/exe"))]
        assert len(qemus) == 2, qemus
        assert (KSM_SYSFS / "run").read_text().strip() == "1"
        run.kill()
        run.wait(30)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(30)
    deadline = time.monotonic() + 60  # the QEMUs end with their harness (parent-death signal)
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in qemus):
        time.sleep(0.2)
    assert not [p for p in qemus if Path(f"/proc/{p}").exists()
                and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"]
    r = cli("share", "no-such-vm", "--domain", "kd2")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    said = r.stdout
    ksm_free = not (sysd / "ksm-saved.json").exists()
    if ksm_free:  # nobody else's KSM control took the lock meanwhile: the killed run's values are back
        # the values themselves are checked on a fake sysfs (test_ksm_unit): here other
        # processes on this machine (outside this tree's lock) may set KSM meanwhile
        assert f"cleanup: KSM settings of a killed run (pid {run.pid}, mode satori+ksm) restored" in said, said
    rec = sysd / "max_map_count.json"
    if rec.exists():  # another engine on this machine holds it: the dead one is dropped, not the value
        assert run.pid not in [h["pid"] for h in json.loads(rec.read_text())["holders"]]
    else:  # restored (or already back); a process outside the harness may change it later
        assert "cleanup: vm.max_map_count" in said or int(sysstate.MAX_MAP_COUNT.read_text()) == mmc_before, said
    again = cli("cleanup")
    assert again.returncode == 0
    assert "KSM" not in again.stdout and "max_map_count" not in again.stdout, again.stdout


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1
