"""Ending Ray actors during cleanup: the one place that knows an actor (or Ray itself) may already be gone."""

from __future__ import annotations

import ray


def kill_actor(handle) -> None:
    """End `handle`'s process for good (no restart); an actor already dead, or a Ray already shut down, is fine."""
    if handle is None:
        return
    try:
        ray.kill(handle, no_restart=True)
    except Exception:
        pass
