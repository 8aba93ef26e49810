"""model.name as a Hugging Face hub id: resolved through the user's own HF cache (a temp HF_HOME the test builds in
the hub's cache layout), offline, to a local snapshot folder that every role loads."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from resetrl.config import ModelConfig
from resetrl.hub import local_snapshot
from resetrl.models import resolve_model

MAIN = "1" * 40
V1 = "2" * 40


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return resolve_model(ModelConfig(name="tiny-llama", cache_dir=str(tmp_path_factory.mktemp("models"))))


def cache_model(hub_cache, repo_id: str, source, commit: str, branch: str | None = "main"):
    """Put the model folder `source` into the hub cache as huggingface_hub leaves a download: files in blobs/ named
    by their hash, snapshots/<commit>/ of symlinks to them, refs/<branch> holding the commit."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in source.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    if branch:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return snapshot


@pytest.fixture()
def hf_home(tmp_path, monkeypatch, tiny_path):
    """A private HF_HOME whose hub cache holds acme/tiny-llama at main and at branch v1; offline, as set by the user."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_model(home / "hub", "acme/tiny-llama", tiny_path, MAIN)
    cache_model(home / "hub", "acme/tiny-llama", tiny_path, V1, branch="v1")
    return home


def test_a_hub_id_resolves_offline_to_its_cached_snapshot_which_loads(hf_home, tiny_path):
    path = resolve_model(ModelConfig(name="acme/tiny-llama"))
    assert path == hf_home / "hub" / "models--acme--tiny-llama" / "snapshots" / MAIN
    model = AutoModelForCausalLM.from_pretrained(path)
    reference = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)
    assert AutoTokenizer.from_pretrained(path).eos_token == "<|im_end|>"


@pytest.mark.parametrize("revision, commit", [(MAIN, MAIN), ("v1", V1), (V1, V1)])
def test_a_revision_picks_a_branch_or_a_commit(hf_home, revision, commit):
    path = resolve_model(ModelConfig(name=f"acme/tiny-llama@{revision}"))
    assert path == hf_home / "hub" / "models--acme--tiny-llama" / "snapshots" / commit


@pytest.mark.parametrize("name", ["acme/not-downloaded", "acme/tiny-llama@v9"])
def test_offline_and_not_cached_names_the_id_the_cache_and_the_fix(hf_home, name):
    with pytest.raises(FileNotFoundError) as caught:
        resolve_model(ModelConfig(name=name))
    message = str(caught.value)
    repo, _, revision = name.partition("@")
    assert message.startswith(f"model.name = {name!r}: not in the Hugging Face cache {hf_home / 'hub'}, and "
                              "HF_HUB_OFFLINE is set, so nothing is downloaded")
    assert f"hf download {repo}" + (f" --revision {revision}" if revision else "") in message
    assert "or unset HF_HUB_OFFLINE; or give a local folder" in message


def test_a_snapshot_that_is_not_a_model_folder_is_refused(hf_home, tmp_path):
    not_a_model = tmp_path / "readme-only"
    not_a_model.mkdir()
    (not_a_model / "README.md").write_text("no weights here")
    cache_model(hf_home / "hub", "acme/readme", not_a_model, "3" * 40)
    with pytest.raises(FileNotFoundError, match=r"model.name = 'acme/readme' \(hub snapshot .*\) is not a Hugging Face "
                                                r"model folder \(no .*config.json\)"):
        resolve_model(ModelConfig(name="acme/readme"))


def test_a_local_folder_wins_over_a_hub_id_of_the_same_name(hf_home, tiny_path, tmp_path, monkeypatch):
    local = tmp_path / "acme" / "tiny-llama"
    local.parent.mkdir()
    local.symlink_to(tiny_path)
    monkeypatch.chdir(tmp_path)
    assert resolve_model(ModelConfig(name="acme/tiny-llama")) == tiny_path


def test_a_name_that_is_neither_lists_what_model_name_takes(hf_home):
    with pytest.raises(FileNotFoundError, match=r"model.name = 'a/b/c' is neither 'smollm2-135m-instruct' nor "
                                                r"'tiny-llama', nor a local folder .*nor a Hugging Face hub id"):
        resolve_model(ModelConfig(name="a/b/c"))


def test_another_nodes_snapshot_path_is_resolved_again_here(hf_home):
    elsewhere = f"/home/someone-else/.cache/huggingface/hub/models--acme--tiny-llama/snapshots/{V1}"
    assert local_snapshot(elsewhere) == hf_home / "hub" / "models--acme--tiny-llama" / "snapshots" / V1
    here = resolve_model(ModelConfig(name="acme/tiny-llama"))
    assert local_snapshot(str(here)) == here
    with pytest.raises(FileNotFoundError, match=r"/nowhere/model does not exist on this node"):
        local_snapshot("/nowhere/model")


def test_the_driver_leaves_hf_hub_offline_to_the_user():
    from resetrl.launch.services import _WORKER_ENV_DEFAULTS

    assert "HF_HUB_OFFLINE" not in _WORKER_ENV_DEFAULTS and "TRANSFORMERS_OFFLINE" not in _WORKER_ENV_DEFAULTS


def test_a_role_handed_another_nodes_snapshot_path_loads_this_nodes_copy(hf_home, redis_server, tmp_path):
    # On a multi-node cluster the driver hands every role the snapshot folder it resolved on its own node; a rollout
    # worker (the learner and the evaluator do the same, first thing) on a node without that folder finds the same
    # id and commit in its own HF cache. It was: the worker's engine failed to load a folder missing on its node.
    from resetrl.actors.rollout_actor import RolloutActor
    from resetrl.config import config_from_dict

    elsewhere = f"/home/someone-else/.cache/huggingface/hub/models--acme--tiny-llama/snapshots/{V1}"
    cfg = config_from_dict({"run_name": "hub-roles", "rollout": {"engine": "hf", "max_new_tokens": 4}})
    actor = RolloutActor(cfg, 0, elsewhere, redis_server.url, str(tmp_path / "weights"))
    try:
        assert actor.tokenizer.name_or_path == str(hf_home / "hub" / "models--acme--tiny-llama" / "snapshots" / V1)
    finally:
        actor.close()
