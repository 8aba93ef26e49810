"""The learner's ranks as Ray actors, behind one handle the driver uses like a single actor's.

`LearnerGroup(...).train_step.remote(timeout_s=5.0)` calls train_step on every rank (a learner step is collective:
learner/learner.py) and returns rank 0's ObjectRef, so the driver's ray.wait / ray.get work unchanged. With
learner.world_size 1 it is exactly the one actor the driver always made; with W > 1 the ranks live in a placement
group of W bundles of learner.cpus CPUs and learner.gpus GPUs (PACK: on as few nodes as fit, where NCCL is fastest).

Rank 0's address and a free port on its node are learned first, from a short task in rank 0's bundle; then all
ranks are created at once, because each one's constructor blocks in init_process_group until every rank has joined.
"""

from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from resetrl.config import RunConfig
from resetrl.net import free_port
from resetrl.launch.ray_actors import kill_actor
from resetrl.worker_logs import actor_options

# How long the placement group may wait for its resources before the run gives up with an explanation.
PLACEMENT_TIMEOUT_S = 300.0


def _rendezvous_address() -> tuple[str, int]:
    """Runs on rank 0's node: its IP and a port free on every interface there (MASTER_ADDR, MASTER_PORT)."""
    return ray.util.get_node_ip_address(), free_port(host="")


class _AllRanks:
    """One learner method, called on every rank in the same order; the answer is rank 0's."""

    def __init__(self, ranks: list, name: str):
        self.ranks, self.name = ranks, name

    def remote(self, *args, **kwargs) -> ray.ObjectRef:
        refs = [getattr(rank, self.name).remote(*args, **kwargs) for rank in self.ranks]
        # The other ranks' answers are not waited for: when one of them fails, rank 0's collective fails too.
        return refs[0]


def learner_restarts(cfg: RunConfig) -> int:
    """How many times Ray may restart a dead single-rank learner: 0 without checkpoints, where the new process would
    begin again from the initial model while the ledger holds the earlier steps as trained."""
    return cfg.learner.max_restarts if cfg.learner.checkpoint_every else 0


class LearnerGroup:
    def __init__(self, cfg: RunConfig, model_path: str, redis_url: str, weights_root: str, resume: bool = False):
        # Imported here, not at the top: the rendezvous task's worker imports this module, and a worker process that
        # has loaded torch aborts as it exits ("UnlockSlow is confused", abseil under torch and Ray's gRPC).
        from resetrl.learner.learner import Learner

        learner = cfg.learner
        self.world_size = learner.world_size
        self.placement_group = None
        actor_cls = ray.remote(Learner)
        if self.world_size == 1:
            # Ray restarts a learner that dies inside the run; it resumes from the newest checkpoint by itself
            # (Learner.__init__). Calls in flight when it died fail (the driver calls again); none is retried.
            self.max_restarts = learner_restarts(cfg)
            self.ranks = [actor_cls.options(num_cpus=learner.cpus, num_gpus=learner.gpus,
                                            max_restarts=self.max_restarts, **actor_options(cfg, "learner-rank0"))
                          .remote(cfg, model_path, redis_url, weights_root, resume=resume)]
            return
        self.max_restarts = 0  # a restarted rank could not rejoin the others' torch.distributed group
        bundle = {"CPU": learner.cpus, **({"GPU": learner.gpus} if learner.gpus else {})}
        self.placement_group = placement_group([bundle] * self.world_size, strategy="PACK")
        try:
            ray.get(self.placement_group.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.placement_group)
            raise RuntimeError(
                f"the Ray cluster did not give the learner {self.world_size} x {bundle} within "
                f"{PLACEMENT_TIMEOUT_S:.0f} s (learner.world_size x learner.cpus / learner.gpus, next to the rollout "
                f"workers' rollout.cpus_per_worker); lower them or add resources (ray.num_cpus for a local cluster)"
            ) from None

        def in_bundle(index: int) -> PlacementGroupSchedulingStrategy:
            return PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=index)

        address, port = ray.get(ray.remote(_rendezvous_address).options(
            num_cpus=learner.cpus, scheduling_strategy=in_bundle(0)).remote())
        self.ranks = [
            actor_cls.options(num_cpus=learner.cpus, num_gpus=learner.gpus, scheduling_strategy=in_bundle(rank),
                              **actor_options(cfg, f"learner-rank{rank}"))
            .remote(cfg, model_path, redis_url, weights_root, resume=resume, rank=rank, master_addr=address,
                    master_port=port)
            for rank in range(self.world_size)
        ]

    # The Learner methods the driver and tests call, each on every rank, answered by rank 0.
    @property
    def train_step(self) -> _AllRanks:
        return _AllRanks(self.ranks, "train_step")

    @property
    def policy_version(self) -> _AllRanks:
        return _AllRanks(self.ranks, "policy_version")

    @property
    def pid(self) -> _AllRanks:
        """Rank 0's process id (run.json's learner_pid: the fault tests kill it)."""
        return _AllRanks(self.ranks, "pid")

    @property
    def checkpoint(self) -> _AllRanks:
        return _AllRanks(self.ranks, "checkpoint")

    @property
    def finish(self) -> _AllRanks:
        return _AllRanks(self.ranks, "finish")

    @property
    def accounting(self) -> _AllRanks:
        return _AllRanks(self.ranks, "accounting")

    @property
    def export_weights(self) -> _AllRanks:
        """The final weights as safetensors bytes (RUN_DIR/final), from rank 0; collective under ZeRO-3."""
        return _AllRanks(self.ranks, "export_weights")

    @property
    def export_adapter(self) -> _AllRanks:
        """learner.lora: the adapter's peft files (RUN_DIR/final/adapter), from rank 0; collective under ZeRO-3."""
        return _AllRanks(self.ranks, "export_adapter")

    def kill(self) -> None:
        """End every rank's process now (Ctrl-C, a failed run); unacked experience stays pending in Redis."""
        for rank in self.ranks:
            kill_actor(rank)
        if self.placement_group is not None:
            try:
                remove_placement_group(self.placement_group)
            except Exception:
                pass  # Ray itself already gone: the group went with it
            self.placement_group = None
