"""Hostile code in the `code` verifier: each attack ends within its limits, scores 0, and leaves nothing behind.

Real subprocesses, real rlimits and namespaces; the worker (this test process) must be unharmed each time.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from resetrl.record import PromptRecord
from resetrl.verifiers import get_verifier
from resetrl.verifiers.code_sandbox import SandboxLimits, _network_namespace_available, run_untrusted

FAST = SandboxLimits(wall_s=5.0, cpu_s=3, memory_bytes=256 * 2**20)


def prompt(tests: str = "assert add(2, 3) == 5", **metadata) -> PromptRecord:
    return PromptRecord(prompt_id="c1", question="Write add(a, b).", answer=tests, task="code", metadata=metadata)


def _sandbox_processes() -> list[int]:
    return [p.pid for p in psutil.process_iter(["cmdline"]) if "main.py" in " ".join(p.info["cmdline"] or [])
            and "-B" in (p.info["cmdline"] or [])]


def test_a_correct_solution_scores_1_and_a_wrong_one_0():
    verify = get_verifier("code")
    good = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert verify(good, prompt()) == 1.0
    assert verify("```python\ndef add(a, b):\n    return a - b\n```", prompt()) == 0.0
    io = prompt(io_tests=[{"input": "2 3\n", "output": "5"}, {"input": "1 1\n", "output": "3"}])
    assert verify("```python\na, b = map(int, input().split())\nprint(a + b)\n```", io) == 0.5


def test_an_infinite_loop_is_killed_by_the_cpu_limit_or_the_wall_timeout():
    started = time.monotonic()
    result = run_untrusted("while True:\n    pass", limits=FAST)
    assert not result.ok and time.monotonic() - started < FAST.wall_s + 3
    sleeper = run_untrusted("import time\ntime.sleep(60)", limits=SandboxLimits(wall_s=1.0))
    assert sleeper.timed_out and not sleeper.ok


def test_a_memory_hog_fails_inside_its_limit():
    result = run_untrusted("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))", limits=FAST)
    assert not result.ok and not result.timed_out
    assert "MemoryError" in result.stderr
    assert psutil.Process().memory_info().rss < 4 * 2**30  # the worker is fine


def test_a_fork_bomb_is_contained_and_leaves_no_process():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass\n"
    started = time.monotonic()
    result = run_untrusted(bomb, limits=FAST)
    assert not result.ok and time.monotonic() - started < FAST.wall_s + 5
    # an escape through a non-audited path (ctypes fork) still meets the process rlimit and the group kill
    raw = ("import ctypes\nlibc = ctypes.CDLL(None)\nfor _ in range(10000):\n    libc.fork()\n")
    run_untrusted(raw, limits=FAST)
    time.sleep(0.5)
    assert _sandbox_processes() == []


def test_no_network():
    code = ("import socket\ns = socket.create_connection(('1.1.1.1', 53), timeout=2)\nprint('connected')")
    result = run_untrusted(code, limits=FAST)
    assert not result.ok and "connected" not in result.stdout
    if _network_namespace_available():
        # even around the audit hook (ctypes socket()), the namespace has no route out
        raw = ("import ctypes, struct\nlibc = ctypes.CDLL(None)\nfd = libc.socket(2, 1, 0)\n"
               "addr = struct.pack('!HH4s8x', 2, 53, bytes([1, 1, 1, 1]))\n"
               "print('rc', libc.connect(fd, addr, len(addr)))")
        escaped = run_untrusted(raw, limits=FAST)
        assert "rc 0" not in escaped.stdout
    else:
        pytest.skip("this kernel refuses network namespaces (documented in the README, Reliability)")


def test_file_writes_outside_the_scratch_dir_are_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    os.chmod(tmp_path, 0o777)  # even a world-writable folder
    result = run_untrusted(f"open({str(target)!r}, 'w').write('x')\n", limits=FAST)
    assert not result.ok and "PermissionError" in result.stderr and not target.exists()
    inside = run_untrusted("open('ok.txt', 'w').write('x')\nprint(open('ok.txt').read())", limits=FAST)
    assert inside.ok and inside.stdout.strip() == "x"
    big = run_untrusted("open('big', 'wb').write(b'0' * (64 * 2**20))", limits=FAST)  # over the file-size limit
    assert not big.ok


def test_a_hostile_response_through_the_verifier_scores_0_and_the_worker_carries_on():
    verify = get_verifier("code")
    for attack in ("import os\nos.system('rm -rf /')", "raise SystemExit(0)", "import os\nos._exit(0)"):
        # an exit with status 0 before the tests must not look like a pass
        assert verify(f"```python\n{attack}\n```", prompt()) == 0.0
    assert verify("```python\nimport os\nos.system('touch /tmp/x')\n```", prompt()) == 0.0
    assert Path("/proc/self").exists()  # still here
