"""Hostile programs for the sandbox tests, and a driver that runs them (also as another user).

Each program tries one escape against the host the test set up, described by a JSON
object the program reads from stdin:

* ``target_dir``: a world-writable host folder that must stay empty;
* ``secret_file``: a world-readable host file whose text must not come out;
* ``port``: a host TCP server on 127.0.0.1 that must get no connection;
* ``abstract``: a host abstract Unix socket that must get no connection;
* ``host_pid``: the test's own process (it must survive);
* ``canary_pid``: a host process that records any SIGUSR1 it receives;
* ``marker``: a unique word; processes left running carry it in their command line,
  and files it writes to the host's /tmp and /dev/shm carry it in their name.

A program prints ``ESCAPED: <what>`` where it got through; the host-side checks are in
``test_rl_sandbox.py``. The first six are the escapes that beat the old audit-hook guard.

Run as a script (``python sandbox_hostile.py SANDBOX_DIR BWRAP``, a spec on stdin), it
imports ``sandbox`` from SANDBOX_DIR, runs every program and prints the results as JSON:
that is how the tests run them as an unprivileged user.
"""

import json
import sys

HOSTILE = {
    # The old guard's closure found with gc and its refusal replaced, then a write outside.
    "audit_hook_closure": r"""
import gc, json, sys, types
spec = json.loads(sys.stdin.read())
for obj in gc.get_objects():
    if isinstance(obj, types.FunctionType) and obj.__name__ in ("hook", "refuse"):
        obj.__code__ = (lambda *a, **k: None).__code__
try:
    open(spec["target_dir"] + "/via_gc.txt", "w").write("pwned")
    print("ESCAPED: wrote after patching the hook")
except OSError as e:
    print("refused:", e)
""",
    # A shell through _posixsubprocess (or plain subprocess: it is allowed now) that
    # writes outside, reads the secret, and signals the host.
    "posixsubprocess_shell": r"""
import json, subprocess, sys
spec = json.loads(sys.stdin.read())
import importlib.machinery
importlib.machinery.BuiltinImporter.find_spec("_posixsubprocess")
script = ("echo pwned > {t}/shell.txt; cat {s}; kill -USR1 {c}; kill -9 {h}; echo shell ran"
          .format(t=spec["target_dir"], s=spec["secret_file"], c=spec["canary_pid"], h=spec["host_pid"]))
out = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True)
print(out.stdout, out.stderr)
""",
    # _ctypes loaded from its .so under another name, then libc's socket() + connect().
    "ctypes_socket": r"""
import glob, importlib.util, json, os, socket, struct, sys
spec = json.loads(sys.stdin.read())
so = glob.glob(os.path.join(os.path.dirname(os.__file__), "lib-dynload", "_ctypes*.so"))
if so:
    loader_spec = importlib.util.spec_from_file_location("_ctypes", so[0])
    sys.modules["_ctypes"] = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(sys.modules["_ctypes"])
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
addr = struct.pack("!HH4s8x", socket.AF_INET, spec["port"], socket.inet_aton("127.0.0.1"))
addr = struct.pack("=H", socket.AF_INET) + addr[2:]
if fd >= 0 and libc.connect(fd, addr, len(addr)) == 0:
    print("ESCAPED: connected through ctypes")
else:
    print("refused: errno", ctypes.get_errno())
""",
    # os.open with dir_fd of a host folder (the old hook resolved the name against cwd).
    "dir_fd_write": r"""
import json, os, sys
spec = json.loads(sys.stdin.read())
try:
    fd = os.open(spec["target_dir"], os.O_RDONLY)
    os.close(os.open("via_dir_fd.txt", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    print("ESCAPED: created through dir_fd")
except OSError as e:
    print("refused:", e)
""",
    # Removes its own folder and leaves a link to a host folder in its place (the old
    # root cleanup then chmod-ed /tmp to 0700).
    "remove_own_folder": r"""
import json, os, shutil, sys
spec = json.loads(sys.stdin.read())
here = os.getcwd()
os.mkdir("locked"); os.chmod("locked", 0)
os.chdir("/")
for attempt in (lambda: shutil.rmtree(here), lambda: os.rmdir(here),
                lambda: os.rename(here, here + ".gone"), lambda: os.symlink(spec["target_dir"], here)):
    try:
        attempt()
    except OSError as e:
        print("refused:", e)
""",
    # A FIFO outside (no audit event at all).
    "mkfifo_outside": r"""
import json, os, sys
spec = json.loads(sys.stdin.read())
try:
    os.mkfifo(spec["target_dir"] + "/fifo")
    print("ESCAPED: fifo outside")
except OSError as e:
    print("refused:", e)
""",
    "write_outside": r"""
import json, os, sys
spec = json.loads(sys.stdin.read())
for path in (spec["target_dir"] + "/planted.txt", "/tmp/" + spec["marker"], "/dev/shm/" + spec["marker"],
             "/var/tmp/" + spec["marker"]):
    try:
        open(path, "w").write("pwned")
        print("wrote", path)  # inside the sandbox's own /tmp this is allowed
    except OSError as e:
        print("refused:", e)
""",
    "read_host_files": r"""
import json, os, sys
spec = json.loads(sys.stdin.read())
try:
    print("ESCAPED:", open(spec["secret_file"]).read())
except OSError as e:
    print("refused:", e)
for path in ("/proc/%d/environ" % spec["host_pid"], "/etc/passwd", "/etc/shadow"):
    try:
        print("ESCAPED:", path, open(path, "rb").read()[:200])
    except OSError as e:
        print("refused:", e)
listings = {}
for folder in ("/", "/root", "/home", "/etc", "/tmp", "/tmp/ray", "/work", "/var", "/run"):
    try:
        listings[folder] = sorted(os.listdir(folder))
    except OSError as e:
        print("refused:", e)
print("listings", json.dumps(listings))
pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print("pids", pids)
print("environ", dict(os.environ))
""",
    "network": r"""
import json, socket, sys
spec = json.loads(sys.stdin.read())
for family, address in ((socket.AF_INET, ("127.0.0.1", spec["port"])),
                        (socket.AF_UNIX, "\0" + spec["abstract"])):
    try:
        socket.socket(family, socket.SOCK_STREAM).connect(address)
        print("ESCAPED: connected to", address)
    except OSError as e:
        print("refused:", e)
try:
    socket.getaddrinfo("pypi.org", 443)
    print("ESCAPED: name lookup")
except OSError as e:
    print("refused:", e)
""",
    "signals": r"""
import json, os, signal, sys
spec = json.loads(sys.stdin.read())
for pid, sig in ((spec["canary_pid"], signal.SIGUSR1), (spec["host_pid"], signal.SIGKILL)):
    try:
        os.kill(pid, sig)
        print("ESCAPED: signalled", pid)
    except OSError as e:
        print("refused:", e)
""",
    # Privileges: setuid gains nothing, no capabilities, no user namespace of its own.
    "privileges": r"""
import subprocess
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
if status["NoNewPrivs"].strip() != "1":
    print("ESCAPED: no_new_privs is off")
if int(status["CapEff"], 16) or int(status["CapBnd"], 16):
    print("ESCAPED: capabilities", status["CapEff"].strip(), status["CapBnd"].strip())
for cmd in (["unshare", "--user", "--map-root-user", "true"], ["su", "-c", "true"]):
    try:
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            print("ESCAPED:", cmd)
    except OSError as e:
        print("refused:", e)
""",
    # A child that leaves the session and sleeps on with the marker in its command line.
    "background_escape": r"""
import json, os, sys
spec = json.loads(sys.stdin.read())
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", spec["marker"]])
    os._exit(0)
print("parent done")
""",
    "fork_bomb": r"""
import json, os, sys
spec = json.loads(sys.stdin.read())
while True:
    try:
        if os.fork() == 0:
            os.execv(sys.executable, [sys.executable, "-c", "import os\nwhile True:\n  try: os.fork()\n  except OSError: pass", spec["marker"]])
    except OSError:
        pass
""",
    "memory_bomb": r"""
hog = []
while True:
    hog.append(bytearray(1 << 20))
""",
    "infinite_loop": "while True:\n    pass\n",
    # Fills every writable place it finds (tmpfs is RAM): each must stop it.
    "disk_filler": r"""
import os
chunk = b"x" * (8 << 20)
for folder in ("/sandbox", "/tmp", "/dev/shm", "/dev", "/", "/usr", "/proc"):
    for i in range(40):  # 320 MiB
        try:
            with open(os.path.join(folder, "fill%d" % i), "wb") as f:
                f.write(chunk)
        except OSError as e:
            print("stopped:", folder, e)
            break
    else:
        print("ESCAPED: wrote 320 MiB to", folder)
""",
}

TIMED = ("infinite_loop", "fork_bomb")  # run until the wall-clock limit


def run_all(sandbox, spec: dict, timeout_s: float, **kw) -> dict:
    """Every hostile program's result, as dicts."""
    import dataclasses

    out = {}
    for name, code in HOSTILE.items():
        # The others end by themselves; a long limit keeps a slow machine from failing them.
        limit = timeout_s if name in TIMED else 30.0
        result = sandbox.run_python(code, json.dumps(spec), timeout_s=limit, memory_mb=256, **kw)
        out[name] = dataclasses.asdict(result)
    return out


if __name__ == "__main__":
    sandbox_dir, bwrap = sys.argv[1], sys.argv[2]
    sys.path.insert(0, sandbox_dir)
    import sandbox  # noqa: E402 -- a copy of megatron_bar/rl/sandbox.py, readable by this user

    sandbox.configure(sandbox.SandboxConfig(bwrap=bwrap))
    print(json.dumps(run_all(sandbox, json.loads(sys.stdin.read()), float(sys.argv[3]))))
