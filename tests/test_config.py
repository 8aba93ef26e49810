"""Config validation: errors name the field and the fix; presets load."""

from pathlib import Path

import pytest

from resetrl.config import ConfigError, config_from_dict, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_unknown_key_names_the_field_and_suggests_the_right_one():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"rollout": {"num_worker": 2}})
    message = str(err.value)
    assert "rollout.num_worker: unknown key" in message
    assert "did you mean 'num_workers'" in message


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="rolout: unknown key; did you mean 'rollout'"):
        config_from_dict({"rolout": {}})


def test_wrong_type_names_the_field_and_the_value():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["learner.lr=fast"])
    message = str(err.value)
    assert "learner.lr" in message and "'fast'" in message and "learner.lr=VALUE" in message


def test_dotted_overrides_are_typed_like_yaml():
    cfg = load_config(CONFIGS / "tiny.yaml", ["learner.lr=3e-5", "rollout.num_workers=3", "queue.redis_url=null"])
    assert cfg.learner.lr == pytest.approx(3e-5)
    assert cfg.rollout.num_workers == 3
    assert cfg.queue.redis_url is None


def test_override_without_equals_sign_explains_the_syntax():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["learner.lr"])


def test_a_step_need_not_divide_into_micro_batches():
    # Micro-batches are packed per step (learner/packing.py): 9 records in micro-batches of 4 is 4 + 4 + 1, and
    # repair's 2 x (4 + 1) records on the tiny preset are no longer refused (issue "faster than TRL").
    cfg = config_from_dict({"learner": {"prompts_per_step": 3, "micro_batch_size": 4}, "rollout": {"group_size": 3}})
    assert cfg.records_per_step == 9
    assert load_config(CONFIGS / "tiny.yaml", ["algorithm.name=repair"]).records_per_step == 10


def test_tiny_model_head_dim_checked_for_vllm():
    with pytest.raises(ConfigError, match="head_dim"):
        config_from_dict({"model": {"tiny": {"hidden_size": 32, "num_attention_heads": 2}}})


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_presets_load(preset):
    load_config(CONFIGS / preset)


def test_the_default_job_evaluates_held_out_problems_during_the_run():
    # `make run` runs the Makefile's CONFIG: it must report held-out accuracy before, every few steps and after
    # (issue "a run you can watch"), so its preset holds problems out and evaluates more than once.
    makefile = (CONFIGS.parent / "Makefile").read_text()
    default = next(line.split("?=")[1].strip() for line in makefile.splitlines() if line.startswith("CONFIG ?="))
    cfg = load_config(CONFIGS.parent / default)
    assert cfg.eval.holdout > 0
    assert 0 < cfg.eval.every < cfg.total_steps


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
