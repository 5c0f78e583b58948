"""Every RL setting is checked before the model is built or Ray starts (issue 27, items 8-10):
a bad value is one ``error:`` line naming its key, exit code 1, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from megatron_bar.rl.trainer import RLTrainConfig
from megatron_bar.train.config import ConfigError, load_config

GOOD = {
    "model": {"load": "runs/tiny/bar2"},
    "rl": {"datasets": [{"path": "prompts.jsonl", "reward": "megatron_bar.demo.toy_rl:digits_reward"}]},
    "train": {"stage": "rlvr", "steps": 2, "output_dir": "OUT"},
}


def config(tmp_path, data=GOOD):
    path = tmp_path / "rl.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("key, value", [
    ("num_workers", 0), ("num_workers", -1), ("prompts_per_rollout", 0), ("temperature", 0),
    ("max_response_tokens", 0), ("clip_low", 1.0), ("clip_high", -0.1), ("kl_beta", -1),
    ("tis_cap", 0), ("cpus_per_worker", 0), ("gpus_per_worker", -1), ("threads_per_worker", 0),
    ("timeout_s", 0),
])
def test_out_of_range_setting_names_its_key(tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"rl\.{key} must be"):
        load_config(config(tmp_path), [f"rl.{key}={value}"], cls=RLTrainConfig)


@pytest.mark.parametrize("reward, message", [
    ("megatron_bar.demo.toy_rl:__name__", "is a str, not a function"),
    ("megatron_bar.demo.toy_rl:no_such_fn", "has no attribute"),
    ("maths", "unknown reward"),
])
def test_bad_reward_names_the_dataset_key(tmp_path, reward, message):
    data = {**GOOD, "rl": {"datasets": [GOOD["rl"]["datasets"][0], {"path": "b.jsonl", "reward": reward}]}}
    with pytest.raises(ConfigError, match=rf"rl\.datasets\[1\]\.reward: .*{message}"):
        load_config(config(tmp_path, data), [], cls=RLTrainConfig)


def test_good_settings_pass(tmp_path):
    load_config(config(tmp_path), [], cls=RLTrainConfig)


@pytest.mark.parametrize("override, data, names", [
    (["rl.num_workers=0"], GOOD, "rl.num_workers must be at least 1"),
    ([], {**GOOD, "rl": {"datasets": [{"path": "p.jsonl", "reward": "megatron_bar.demo.toy_rl:__name__"}]}},
     "rl.datasets[0].reward: reward 'megatron_bar.demo.toy_rl:__name__' is a str, not a function"),
])
def test_cli_refuses_before_anything_starts(tmp_path, override, data, names):
    """Through ``python -m megatron_bar.rl``: model.load does not even exist, so reaching
    the model or Ray would be a different error."""
    out = tmp_path / "out"
    data = {**data, "train": {**data["train"], "output_dir": str(out)}}
    proc = subprocess.run([sys.executable, "-m", "megatron_bar.rl", str(config(tmp_path, data)), *override],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: {names}"), proc.stderr
    assert not out.exists()
