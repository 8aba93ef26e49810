"""The "code" verifier: run a response's Python against the prompt's tests, in a sandboxed subprocess.

The code is untrusted (a policy under RL will find whatever the reward lets it do), so it never runs in the
worker. `run_untrusted` starts a fresh interpreter with, layer by layer:
  - rlimits (kernel-enforced): CPU seconds, address space (memory), file size, open files, processes, no core;
  - a wall-clock timeout, after which its whole process group is killed (SIGKILL), children included;
  - no network: a new, empty network namespace (unshare(CLONE_NEWNET); unprivileged users get it inside a new
    user namespace). Where the kernel refuses (some containers' seccomp), the result says network_isolated=False
    and the verifier logs it once: run the workers in a network-less container there;
  - a scratch directory (fresh, deleted afterwards) as cwd, HOME and TMPDIR, and an empty environment;
  - when the worker runs as root: the child runs as `nobody`, so the process rlimit counts and no root-owned
    file can be written; the interpreter is then a system python3 that `nobody` can execute;
  - an audit hook (installed before the code runs, cannot be removed from Python) that refuses opening files for
    writing outside the scratch dir, starting processes, and sockets. It is a tripwire on top of the kernel
    limits, not a boundary by itself (ctypes could step around it; the rlimits and namespaces still hold).
Scoring: prompt.answer (or metadata["tests"]) is Python test code (asserts) appended to the extracted solution;
reward 1.0 when the program exits 0 within the limits having printed a random sentinel after the tests (so an
early `sys.exit(0)` earns nothing), else 0.0. The tests run in the solution's process, so a program that reads
its own source could still forge the sentinel: fine against sloppy policies, not a proof against a determined one. With metadata["io_tests"] = [{"input",
"output"}, ...] the solution runs once per test on that stdin and scores the fraction whose stdout matches.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from resetrl.record import PromptRecord
from resetrl.verifiers import register

log = logging.getLogger(__name__)

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_FENCED = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

# Runs before the untrusted code, in the child. Audit events: https://docs.python.org/3/library/audit_events.html
_PRELUDE = r'''
import os as _os, sys as _sys
_SCRATCH = _os.path.realpath(_os.getcwd())
def _guard(event, args, _scratch=_SCRATCH, _real=_os.path.realpath, _str=str, _isinstance=isinstance, _int=int):
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in mode for c in "wax+")) or (_isinstance(flags, _int) and flags & 3)
        if writing and path is not None and not _isinstance(path, _int):
            full = _real(_os.fsdecode(path) if not _isinstance(path, _str) else path)
            if full != _scratch and not full.startswith(_scratch + "/"):
                raise PermissionError("sandbox: writing outside the scratch dir is not allowed: " + full)
    elif event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                   "os.forkpty", "pty.spawn", "socket.__new__", "socket.connect", "socket.bind", "os.kill",
                   "os.killpg", "ctypes.dlopen", "os.chdir", "os.chroot"):
        raise PermissionError("sandbox: " + event + " is not allowed")
_sys.addaudithook(_guard)
del _guard
'''


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 10.0
    cpu_s: int = 5
    memory_bytes: int = 512 * 2**20
    file_bytes: int = 16 * 2**20
    processes: int = 32
    open_files: int = 64
    output_bytes: int = 1 * 2**20  # stdout/stderr kept (the rest is discarded)


@dataclass
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    network_isolated: bool

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@functools.lru_cache(maxsize=1)
def _network_namespace_available() -> bool:
    """Probe once, in a throwaway child, whether this kernel lets us create a network namespace."""
    script = (
        "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True)\n"
        f"ok = libc.unshare({_CLONE_NEWNET}) == 0 or libc.unshare({_CLONE_NEWUSER | _CLONE_NEWNET}) == 0\n"
        "sys.exit(0 if ok else 1)"
    )
    probe = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, timeout=30)
    return probe.returncode == 0


@functools.lru_cache(maxsize=1)
def _unprivileged_user() -> tuple[int, int, str] | None:
    """(uid, gid, python) to run as when we are root: `nobody` and a python3 it can execute; else None."""
    if os.geteuid() != 0:
        return None
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        return None
    for python in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3"), sys.executable):
        if not python:
            continue
        try:
            check = subprocess.run([python, "-I", "-S", "-c", "pass"], user=nobody.pw_uid, group=nobody.pw_gid,
                                   extra_groups=[], capture_output=True, timeout=30)
        except OSError:  # not executable by nobody (e.g. a venv under /root)
            continue
        if check.returncode == 0:
            return nobody.pw_uid, nobody.pw_gid, python
    return None


# Runs first in the child (a fresh, single-threaded interpreter: no preexec_fn, which is unsafe in a threaded
# worker), applies the namespace, user and rlimits, then replaces itself with the interpreter running main.py.
_LAUNCHER = r"""
import ctypes, json, os, resource, sys
a = json.loads(sys.argv[1])
if a["isolate"]:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(a["newnet"]) != 0:
        libc.unshare(a["newuser"] | a["newnet"])
if a["uid"] is not None:
    os.setgroups([])
    os.setgid(a["gid"])
    os.setuid(a["uid"])
for name, value in a["limits"]:
    resource.setrlimit(getattr(resource, name), (value, value))
os.execv(a["python"], [a["python"], "-I", "-S", "-B", "main.py"])
"""


def _launch_command(limits: SandboxLimits, isolate_network: bool, user: tuple[int, int, str] | None) -> list[str]:
    python = user[2] if user is not None else sys.executable
    args = {
        "isolate": isolate_network, "newnet": _CLONE_NEWNET, "newuser": _CLONE_NEWUSER, "python": python,
        "uid": user[0] if user else None, "gid": user[1] if user else None,
        "limits": [("RLIMIT_CPU", limits.cpu_s), ("RLIMIT_AS", limits.memory_bytes),
                   ("RLIMIT_FSIZE", limits.file_bytes), ("RLIMIT_NPROC", limits.processes),
                   ("RLIMIT_NOFILE", limits.open_files), ("RLIMIT_CORE", 0)],
    }
    return [python, "-I", "-S", "-B", "-c", _LAUNCHER, json.dumps(args)]


def run_untrusted(code: str, stdin: str = "", limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `code` (Python source) under the limits above; never raises for anything the code does."""
    scratch = tempfile.mkdtemp(prefix="resetrl-sandbox-")
    user = _unprivileged_user()
    isolate = _network_namespace_available()
    try:
        if user is not None:
            os.chown(scratch, user[0], user[1])
        os.chmod(scratch, 0o700)
        with open(os.path.join(scratch, "main.py"), "w", encoding="utf-8") as handle:
            handle.write(_PRELUDE + "\n" + code)
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        process = subprocess.Popen(
            _launch_command(limits, isolate, user), cwd=scratch, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
        )
        timed_out = False
        try:
            stdout, stderr = process.communicate(stdin.encode("utf-8", "replace"), timeout=limits.wall_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(process.pid)
            stdout, stderr = process.communicate()
        _kill_group(process.pid)  # whatever it left behind (background children) goes too
        return SandboxResult(
            returncode=process.returncode, timed_out=timed_out, network_isolated=isolate,
            stdout=stdout[: limits.output_bytes].decode("utf-8", "replace"),
            stderr=stderr[: limits.output_bytes].decode("utf-8", "replace"),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def extract_code(response_text: str) -> str:
    """The last fenced ```python block of the response, else the whole response."""
    blocks = _FENCED.findall(response_text)
    return blocks[-1] if blocks else response_text


_warned_no_network_isolation = False


@register("code")
def code_verifier(response_text: str, prompt: PromptRecord) -> float:
    global _warned_no_network_isolation
    solution = extract_code(response_text)
    io_tests = prompt.metadata.get("io_tests") if isinstance(prompt.metadata, dict) else None
    if io_tests:
        passed = 0
        for test in io_tests:
            result = run_untrusted(solution, stdin=str(test.get("input", "")))
            passed += result.ok and result.stdout.strip() == str(test.get("output", "")).strip()
        score = passed / len(io_tests)
    else:
        tests = prompt.metadata.get("tests") if isinstance(prompt.metadata, dict) else None
        # Exit status 0 alone would pay `raise SystemExit(0)` before the tests: the tests must reach the end.
        sentinel = f"resetrl-tests-passed-{secrets.token_hex(8)}"
        result = run_untrusted(f"{solution}\n\n{tests or prompt.answer}\nprint({sentinel!r})\n")
        score = 1.0 if result.ok and result.stdout.rstrip().endswith(sentinel) else 0.0
    if not _network_namespace_available() and not _warned_no_network_isolation:
        _warned_no_network_isolation = True
        log.warning("code verifier: this kernel refuses network namespaces; untrusted code has network access")
    return score
