"""Weight sync: seconds per policy update vs the memcpy floor.

One update = SharedFolderWeightChannel.publish(state_dict) (safetensors into /dev/shm, announced in a real
embedded Redis) + engine.load_weights(path) for each engine (hf: load_state_dict-style copy_; vllm:
collective_rpc("reload_weights") + prefix-cache reset). The floor is model bytes / memcpy bandwidth, measured in
the same run as `dst.copy_(src)` into a preallocated tensor of the model's size. Publish and load are timed
separately, interleaved with the memcpy measurement, >= 3 repeats each.

    python bench/weight_sync.py                                      # tiny-llama, hf and vllm
    python bench/weight_sync.py --model smollm2-135m-instruct        # 538 MB fp32
"""

from __future__ import annotations

import _common  # noqa: F401  (environment first)

import argparse
import sys
import tempfile
import time

from _common import TINY, load_cfg, machine, stats, write_results
from resetrl.models import resolve_model
from resetrl.queue import connect
from resetrl.redis_server import EmbeddedRedis
from resetrl.run_state import RunKeys
from resetrl.weights import SharedFolderWeightChannel, unique_tensors


def memcpy_gbps(nbytes: int) -> float:
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch the pages first
    started = time.perf_counter()
    dst.copy_(src)
    seconds = time.perf_counter() - started
    return nbytes / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(TINY))
    parser.add_argument("--model", default="tiny-llama", help="tiny-llama or smollm2-135m-instruct")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

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
        channel = SharedFolderWeightChannel(root, client, RunKeys(cfg.run_name))
        version = 0
        for name in args.engines.split(","):
            started = time.perf_counter()
            engine = make_engine(name, model_path, dtype="float32", seed=0, kv_cache_gib=cfg.rollout.vllm_kv_cache_gib)
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
                engine.load_weights(location)
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
                  "channel": "SharedFolderWeightChannel (/dev/shm)"},
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
