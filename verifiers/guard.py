"""A per-call time limit for verifiers: a verifier that hangs scores 0 and is counted; the worker carries on.

`call_with_timeout` runs the verifier in a daemon thread and waits at most `timeout_s` for it. Python cannot
kill a thread, so a verifier that never returns is abandoned, not stopped: it keeps its thread (and a share of
the GIL) until the process ends, and `abandoned_threads()` says how many there are. Hence verifiers that run
untrusted or unbounded work belong in a subprocess with a hard kill, as the `code` verifier does
(verifiers/code_sandbox.py). A thread, not a signal: math-verify sets its own SIGALRM timer, which a signal-based
outer limit would fight with, and signals only reach the main thread.
"""

from __future__ import annotations

import threading
from typing import Any, Callable


class VerifierTimeout(TimeoutError):
    """The verifier did not return within its time limit."""


_abandoned: list[threading.Thread] = []


def abandoned_threads() -> int:
    """Verifier threads that timed out and are still running."""
    _abandoned[:] = [thread for thread in _abandoned if thread.is_alive()]
    return len(_abandoned)


def call_with_timeout(fn: Callable[..., Any], timeout_s: float | None, *args: Any) -> Any:
    """fn(*args), or VerifierTimeout after timeout_s seconds (None or <= 0: no limit, called inline)."""
    if not timeout_s or timeout_s <= 0:
        return fn(*args)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller, whatever it is
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"verifier-{getattr(fn, '__name__', 'fn')}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        _abandoned.append(thread)
        raise VerifierTimeout(f"verifier did not return within {timeout_s:g} s (abandoned; {abandoned_threads()} "
                              "abandoned verifier threads in this worker)")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
