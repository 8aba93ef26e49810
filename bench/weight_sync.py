"""Weight sync: seconds per policy update vs the memcpy floor.

One update = SharedFolderWeightChannel.publish(state_dict) (safetensors into /dev/shm, announced in a real
embedded Redis) + engine.load_weights(path) for each engine (hf: load_state_dict-style copy_; vllm:
collective_rpc("reload_weights") + prefix-cache reset). The floor is model bytes / memcpy bandwidth, measured in
the same run as `dst.copy_(src)` into a preallocated tensor of the model's size. Publish and load are timed
separately, interleaved with the memcpy measurement, >= 3 repeats each.

With --channels shared_folder,ray_object_store the same update also goes through the Ray object store channel
(ray.put of the safetensors bytes, fetched into the engine's tmpfs folder) on a local Ray cluster.

--transport measures the nccl channel's data path alone, on this machine's device (CUDA: NCCL; CPU: gloo) with a
one-rank group: plan buckets, pack each (copy into one buffer), broadcast, unpack and copy into a second model's
tensors. A one-rank broadcast moves no bytes between GPUs, so this is the per-GPU cost around the wire (on one
GPU NCCL refuses a second rank: "Duplicate GPU detected"); the floor is one device-to-device copy of the model.

    python bench/weight_sync.py                                      # tiny-llama, hf and vllm
    python bench/weight_sync.py --model smollm2-135m-instruct        # 538 MB fp32
    python bench/weight_sync.py --transport --params 1.7e9 --dtype bfloat16   # bucketed transport, GB/s
"""

from __future__ import annotations

import _common  # noqa: F401  (environment first)

import argparse
import json
import sys
import tempfile
import time

from _common import TINY, load_cfg, machine, stats, write_results
from resetrl.models import resolve_model
from resetrl.queue import connect
from resetrl.launch.redis_server import EmbeddedRedis
from resetrl.run_state import RunKeys
from resetrl.actors.engines.weight_receivers import RayObjectStoreWeightReceiver, SharedFolderWeightReceiver
from resetrl.weights import RayObjectStoreWeightChannel, SharedFolderWeightChannel, unique_tensors


def memcpy_gbps(nbytes: int) -> float:
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    started = time.perf_counter()
    dst.copy_(src)
    seconds = time.perf_counter() - started
    return nbytes / seconds / 1e9


def transport(params: float, dtype_name: str, bucket_mbs: list[float], repeats: int) -> dict:
    """Seconds per update of the bucketed data path (plan, pack, broadcast, unpack + copy) vs one plain copy."""
    import torch

    from resetrl.net import free_port
    from resetrl.weights.buckets import broadcast_bucket, open_group, open_store, pack_bucket, plan_buckets, unpack_bucket

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dtype = getattr(torch, dtype_name)
    # A Llama-like mix of shapes: square and MLP matrices of hidden 2048 until the parameter count is reached.
    hidden, shapes, total = 2048, [], 0
    while total < params:
        for shape in ((hidden, hidden), (hidden, hidden // 4), (hidden, hidden // 4), (hidden, hidden),
                      (4 * hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden), (hidden,), (hidden,)):
            shapes.append(shape)
            total += torch.Size(shape).numel()
    source = {f"t{i}": torch.randn(shape, device=device).to(dtype) for i, shape in enumerate(shapes)}
    target = {name: torch.empty_like(t) for name, t in source.items()}
    nbytes = sum(t.numel() * t.element_size() for t in source.values())
    group = open_group(open_store("127.0.0.1", free_port(), 0, 1, 120), 0, 1, "nccl" if cuda else "gloo", 120)
    flat_src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    flat_dst = torch.empty_like(flat_src)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def floor_seconds():
        sync()
        started = time.perf_counter()
        flat_dst.copy_(flat_src)
        sync()
        return time.perf_counter() - started

    def update_seconds(buckets):
        sync()
        started = time.perf_counter()
        for bucket in buckets:
            buffer = pack_bucket(bucket, [source[s.name] for s in bucket], device)
            broadcast_bucket(group, buffer)
            for name, tensor in unpack_bucket(buffer, bucket):
                target[name].copy_(tensor)
        sync()
        return time.perf_counter() - started

    rows = {}
    for bucket_mb in bucket_mbs:
        buckets = plan_buckets([(n, t.shape, t.dtype) for n, t in source.items()], int(bucket_mb * 2**20))
        update_seconds(buckets)  # warm-up: NCCL connects, the allocator caches the buffers
        floors, updates = [], []
        for rep in range(repeats):  # interleaved, alternating which goes first
            pair = (floor_seconds, lambda: update_seconds(buckets))
            for fn in pair if rep % 2 == 0 else pair[::-1]:
                (floors if fn is floor_seconds else updates).append(fn())
        assert all(torch.equal(target[n], source[n]) for n in source)
        rows[f"bucket_{bucket_mb:g}MB"] = {
            "buckets": len(buckets),
            "update_seconds": stats(updates),
            "seconds_per_gb": stats([u / (nbytes / 1e9) for u in updates]),
            "gb_per_s": stats([nbytes / u / 1e9 for u in updates]),
            "floor_copy_seconds": stats(floors),
            "update_over_floor": stats([u / f for u, f in zip(updates, floors)]),
        }
    return {
        "setup": {"params": total, "dtype": dtype_name, "bytes": nbytes, "tensors": len(shapes), "repeats": repeats,
                  "device": torch.cuda.get_device_name(0) if cuda else "cpu", "backend": "nccl" if cuda else "gloo",
                  "group_ranks": 1},
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(TINY))
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama or smollm2-135m-instruct")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--channels", default="shared_folder", help="shared_folder and/or ray_object_store")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--transport", action="store_true", help="only the nccl channel's bucketed data path")
    parser.add_argument("--params", type=float, default=135e6, help="--transport: parameters moved per update")
    parser.add_argument("--dtype", default="bfloat16", help="--transport: dtype of the parameters")
    parser.add_argument("--bucket-mb", default="64,256,1024", help="--transport: bucket sizes to compare")
    args = parser.parse_args()
    if args.transport:
        result = transport(args.params, args.dtype, [float(b) for b in args.bucket_mb.split(",")], args.repeats)
        result["machine"] = machine()
        print(json.dumps(result, indent=1))
        return

    import torch
    from transformers import AutoModelForCausalLM

    from resetrl.actors.engines import make_engine

    cfg = load_cfg(args.config, ["run_name=bench-weights", f"model.name={args.model}"])
    model_path = str(resolve_model(cfg.model))
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    state = model.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in unique_tensors(state).values())

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-weights-redis-") as tmp, EmbeddedRedis(tmp) as server, \
            tempfile.TemporaryDirectory(prefix="bench-weights-", dir="/dev/shm") as root:
        client = connect(server.url)
        version = 0
        runs = [(c, e) for c in args.channels.split(",") for e in args.engines.split(",")]
        if "ray_object_store" in args.channels:
            import ray

            ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
        for channel_name, engine_name in runs:
            name = engine_name if channel_name == "shared_folder" else f"{engine_name} via {channel_name}"
            channel = (SharedFolderWeightChannel(root, client, RunKeys(cfg.run_name)) if channel_name == "shared_folder"
                       else RayObjectStoreWeightChannel(root, client, RunKeys(cfg.run_name)))
            receiver = (SharedFolderWeightReceiver(client, RunKeys(cfg.run_name)) if channel_name == "shared_folder"
                        else RayObjectStoreWeightReceiver(root, client, RunKeys(cfg.run_name)))
            started = time.perf_counter()
            engine = make_engine(engine_name, model_path, dtype="float32", seed=0,
                                 kv_cache_gib=cfg.rollout.vllm_kv_cache_gib)
            startup = time.perf_counter() - started
            memcpy, publish, load = [], [], []
            for rep in range(args.repeats + 1):  # the first repeat warms up and is not counted
                bandwidth = memcpy_gbps(nbytes)
                with torch.no_grad():  # a different policy each version, as after an optimizer step
                    for tensor in state.values():
                        tensor.mul_(1.0 + 1e-4)
                version += 1
                started = time.perf_counter()
                location = channel.publish(state, version)
                published = time.perf_counter() - started
                started = time.perf_counter()
                receiver.load_into(engine, version, location)
                loaded = time.perf_counter() - started
                if rep:
                    memcpy.append(bandwidth)
                    publish.append(published)
                    load.append(loaded)
                print(f"  {name} repeat {rep}: memcpy {bandwidth:.2f} GB/s publish {published:.3f}s load {loaded:.3f}s",
                      file=sys.stderr, flush=True)
            engine.close()
            floors = [nbytes / (gbps * 1e9) for gbps in memcpy]
            results[name] = {
                "engine_startup_seconds": round(startup, 2),
                "memcpy_gb_per_s": stats(memcpy),
                "floor_seconds": stats(floors),
                "publish_seconds": stats(publish),
                "load_seconds": stats(load),
                "update_seconds": stats([p + l for p, l in zip(publish, load)]),
                "update_over_floor": stats([(p + l) / f for p, l, f in zip(publish, load, floors)]),
            }
        client.close()

    result = {
        "setup": {"model": args.model, "model_bytes": nbytes, "dtype": "float32", "repeats": args.repeats,
                  "channels": args.channels},
        "machine": machine(),
        "engines": results,
    }

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results)
    publish = [results[n]["publish_seconds"]["median"] for n in names]
    load = [results[n]["load_seconds"]["median"] for n in names]
    ax.bar(names, publish, label="publish (safetensors to /dev/shm)", color="#4C72B0")
    ax.bar(names, load, bottom=publish, label="engine.load_weights", color="#DD8452")
    floor = min(results[n]["floor_seconds"]["median"] for n in names)
    ax.axhline(floor, color="#C44E52", linestyle="--", label=f"memcpy floor {floor:.4f} s")
    for i, n in enumerate(names):
        ax.text(i, publish[i] + load[i], f"{results[n]['update_over_floor']['median']:.0f}x floor", ha="center", va="bottom")
    ax.set_ylabel("seconds per update (median)")
    ax.set_title(f"{args.model}: {nbytes / 1e6:.0f} MB fp32")
    ax.legend(fontsize=8)
    write_results("weight_sync" + ("" if args.model == "tiny-llama" else f"-{args.model}"), result, fig)


if __name__ == "__main__":
    main()
