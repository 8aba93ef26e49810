"""W&B logging (logging.wandb, the optional `wandb` extra): an offline run writes its run folder under RUN_DIR/wandb
with the same namespaced scalars TensorBoard gets, read back from the run's own record file."""

from __future__ import annotations

import importlib.util
import json
import struct

import pytest

from resetrl.config import ConfigError, WandbConfig, load_config
from resetrl.metrics import WANDB_STEP_METRIC, MetricsSink, namespaced, start_wandb

wandb = pytest.importorskip("wandb", reason="the optional extra is not installed: pip install 'resetrl[wandb]'")


def read_run_records(path):
    """The records of a .wandb file: a LevelDB-style log (7-byte file header, 32 KiB blocks of records with a
    7-byte header: crc32, length, type 1 = full, 2/3/4 = first/middle/last piece) of wandb Record protobufs."""
    from wandb.proto import wandb_internal_pb2

    data, pos, pieces, records = path.read_bytes(), 7, b"", []
    block = 32 * 1024
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def logged_history(run_file) -> list[dict]:
    rows = []
    for record in read_run_records(run_file):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_an_offline_run_writes_its_folder_with_the_runs_scalars(tmp_path):
    run = start_wandb(WandbConfig(project="resetrl-test", mode="offline"), tmp_path, "wb-test",
                      config={"algorithm": {"name": "grpo"}})
    sink = MetricsSink(None, use_ray=False, wandb_run=run)
    sink.log(1, namespaced(learner={"loss": 0.5, "is_weight_mean": 0.9}, rollout={"reward_mean_rollout": None}))
    sink.log(2, namespaced(learner={"loss": 0.25}))
    sink.log(0, namespaced(eval={"accuracy": 0.5, "pass@4": 0.75}))  # at an earlier step: kept all the same
    sink.close()

    folders = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(folders) == 1
    run_files = list(folders[0].glob("run-*.wandb"))
    assert len(run_files) == 1 and (tmp_path / "wandb-run-id").read_text() in run_files[0].name
    history = logged_history(run_files[0])
    ours = [{k: v for k, v in row.items() if not k.startswith("_")} for row in history]
    assert ours == [
        {"learner/loss": 0.5, "learner/is_weight_mean": 0.9, WANDB_STEP_METRIC: 1},
        {"learner/loss": 0.25, WANDB_STEP_METRIC: 2},
        {"eval/accuracy": 0.5, "eval/pass@4": 0.75, WANDB_STEP_METRIC: 0},
    ]
    runs = [r.run for r in read_run_records(run_files[0]) if r.WhichOneof("record_type") == "run"]
    assert runs[0].project == "resetrl-test" and runs[0].display_name == "wb-test"
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert config["algorithm"] == {"name": "grpo"}


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    settings = WandbConfig(project="resetrl-test", mode="offline")
    first = start_wandb(settings, tmp_path, "wb-resume")
    first_id = first.id
    first.finish()
    wandb.teardown()
    second = start_wandb(settings, tmp_path, "wb-resume", resume=True)
    assert second.id == first_id
    second.finish()
    wandb.teardown()


def test_no_project_or_disabled_mode_starts_nothing(tmp_path):
    assert start_wandb(WandbConfig(), tmp_path, "x") is None
    assert start_wandb(WandbConfig(project="p", mode="disabled"), tmp_path, "x") is None
    assert not (tmp_path / "wandb").exists()
    assert load_config(None).logging.wandb.project is None  # TensorBoard alone by default


def test_a_project_without_wandb_installed_is_a_config_error(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"logging\.wandb.*pip install 'resetrl\[wandb\]'"):
        load_config(None, ["logging.wandb.project=p"])
    load_config(None, ["logging.wandb.project=p", "logging.wandb.mode=disabled"])  # disabled needs no package
