"""A live rollout worker keeps the prompts it holds however long its batch takes; only a dead worker's are reclaimed
(leases: RolloutActor renews its claim, StreamQueue.renew). Real HF engine on the tiny random Llama, real
redis-server, no Ray.
"""

from __future__ import annotations

import threading
import time

from resetrl.actors.rollout_actor import RolloutActor
from resetrl.config import ModelConfig, config_from_dict
from resetrl.models import resolve_model
from resetrl.queue import StreamQueue
from resetrl.record import PromptRecord, decode_experience, encode_prompt
from resetrl.run_state import EXPERIENCE_GROUP, PROMPT_GROUP, RunKeys, request_stop

CLAIM_IDLE_MS = 300
BATCH_SECONDS = 2.0  # well over claim_idle_ms


class SlowEngine:
    """The real engine, whose every generate call first waits: a batch that takes longer than claim_idle_ms."""

    def __init__(self, engine, seconds: float):
        self.engine, self.seconds = engine, seconds

    def generate(self, *args, **kwargs):
        time.sleep(self.seconds)
        return self.engine.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_a_busy_worker_keeps_its_prompts_past_claim_idle_ms(redis_server, redis_client, tmp_path):
    cfg = config_from_dict({
        "run_name": "lease", "seed": 0, "model": {"name": "tiny-llama"},
        "rollout": {"engine": "hf", "group_size": 2, "prompts_per_batch": 2, "max_new_tokens": 4},
        "learner": {"prompts_per_step": 1, "micro_batch_size": 2},
        "queue": {"claim_idle_ms": CLAIM_IDLE_MS},
    })
    keys = RunKeys(cfg.run_name)
    prompts = StreamQueue(redis_client, keys.prompts, PROMPT_GROUP, "driver")
    prompts.ensure_group()
    StreamQueue(redis_client, keys.experience, EXPERIENCE_GROUP, "learner").ensure_group()
    prompts.put_many([encode_prompt(PromptRecord(f"p{i}", f"{i} + 1", str(i + 1), "basic_arithmetic"))
                      for i in range(2)])
    busy = RolloutActor(cfg, 0, str(resolve_model(ModelConfig(name="tiny-llama"))), redis_server.url,
                        str(tmp_path / "weights"))
    busy.engine = SlowEngine(busy.engine, BATCH_SECONDS)
    worker = threading.Thread(target=busy.run)
    worker.start()
    # Another worker looks for idle prompts all the while, as a live worker does every few loop iterations.
    other = StreamQueue(redis_client, keys.prompts, PROMPT_GROUP, "rollout-1")
    taken = []
    deadline = time.monotonic() + BATCH_SECONDS + 1.0
    while time.monotonic() < deadline:
        taken += other.reclaim(min_idle_ms=CLAIM_IDLE_MS)
        time.sleep(0.05)
    request_stop(redis_client, keys)
    worker.join(timeout=60)
    assert taken == []  # the busy worker's lease held
    experience = StreamQueue(redis_client, keys.experience, EXPERIENCE_GROUP, "learner").read(count=100)
    assert sorted({decode_experience(e.payload).prompt_id for e in experience}) == ["p0", "p1"]
    assert prompts.consumers().get("rollout-1", 0) == 0 and prompts.pending_count() == 0
    busy.close()
