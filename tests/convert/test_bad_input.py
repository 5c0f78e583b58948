"""Bad input to the conversion tools is a one-line ``error:`` that names the culprit.

Each case runs the real tool (``tools/*.py``) as a subprocess, because the exit code and
stderr are what a user sees, and checks: exit code 1, exactly one ``error:`` line and it
is the last line of stderr, the offending file / key / path named in it, no traceback,
nothing on stdout claiming success, and no output left behind (neither the output folder
nor its ``.NAME.incomplete`` sibling).

A tool run costs ~6 s of megatron import, so the module fixture ``runs`` prepares every
case up front and runs the subprocesses concurrently (one per core); the tests then only
assert on the results. Cheap checks of the same validation code run in-process below.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from helpers import run_tool
from megatron_bar.utils.fs import atomic_output_dir, incomplete_path

HF_TO_MCORE = "convert_hf_to_mcore.py"
MCORE_TO_HF = "convert_mcore_to_hf.py"
UPCYCLE = "upcycle.py"


# -- preparing bad inputs (always on copies, never on the session fixtures) ----------------


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def shard_in_two(hf_dir: Path) -> list[Path]:
    """Rewrite ``model.safetensors`` as two shards plus an index, as save_pretrained does."""
    single = hf_dir / "model.safetensors"
    tensors = load_file(single)
    single.unlink()
    keys = sorted(tensors)
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {}
    for name, part in zip(names, (keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        save_file({k: tensors[k] for k in part}, str(hf_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    return [hf_dir / n for n in names]


def drop_tensor(hf_dir: Path, key: str) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    del tensors[key]
    save_file(tensors, str(path), metadata={"format": "pt"})


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the cases -----------------------------------------------------------------------------


@dataclass
class Case:
    tool: str
    args: list[str]
    out: Path  # the tool's --save
    names: tuple[str, ...]  # what the error line must contain
    existing: dict[str, bytes] | None = None  # out's contents when it existed beforehand
    proc: subprocess.CompletedProcess | None = field(default=None, repr=False)


def build_cases(root: Path, hf_dense: Path, hf_moe: Path, mc_dense: Path, mc_moe: Path):
    cases: dict[str, Case] = {}

    def hf_case(name, hf_dir, *names):
        out = root / f"out-{name}"
        cases[name] = Case(HF_TO_MCORE, ["--hf-dir", str(hf_dir), "--save", str(out)], out, names)

    # 1. a truncated safetensors file
    d = copy_dir(hf_dense, root / "truncated")
    weights = d / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    hf_case("truncated", d, str(weights))

    # 2. no weights at all
    d = copy_dir(hf_dense, root / "no-weights")
    (d / "model.safetensors").unlink()
    hf_case("no_weights", d, str(d), "model.safetensors")

    # 3. a sharded folder with one shard gone
    d = copy_dir(hf_dense, root / "sharded")
    shards = shard_in_two(d)
    shards[1].unlink()
    hf_case("missing_shard", d, str(shards[1]))

    # 4. config.json that does not match the tensors
    d = copy_dir(hf_dense, root / "ffn-mismatch")
    edit_config(d, intermediate_size=128)
    hf_case(
        "config_mismatch", d,
        "'model.layers.0.mlp.gate_proj.weight'", "config does not match", str(d / "config.json"),
    )

    # 5. a tensor missing (an expert's, in the MoE)
    d = copy_dir(hf_moe, root / "missing-tensor")
    drop_tensor(d, "model.layers.1.mlp.experts.3.down_proj.weight")
    hf_case("missing_tensor", d, "'model.layers.1.mlp.experts.3.down_proj.weight'", "missing")

    # 6. an architecture megatron_bar does not convert
    d = copy_dir(hf_dense, root / "llama")
    edit_config(d, architectures=["LlamaForCausalLM"], model_type="llama")
    hf_case("unsupported_arch", d, str(d / "config.json"), "LlamaForCausalLM", "not supported")

    # 7. the output exists already, for each tool
    for tool, load_args in (
        (HF_TO_MCORE, ["--hf-dir", str(hf_dense)]),
        (MCORE_TO_HF, ["--load", str(mc_dense)]),
        (UPCYCLE, ["--load", str(mc_dense)]),
    ):
        out = root / f"existing-{tool.removesuffix('.py')}"
        out.mkdir()
        (out / "keep.txt").write_text("earlier results\n")
        name = f"exists_{tool.removesuffix('.py')}"
        cases[name] = Case(
            tool, [*load_args, "--save", str(out)], out, (str(out), "already exists"),
            existing=snapshot(out),
        )

    # 8. --load of a folder that is not a checkpoint
    d = root / "not-a-checkpoint"
    d.mkdir()
    (d / "notes.txt").write_text("not a checkpoint\n")
    out = root / "out-not-ckpt"
    cases["not_checkpoint"] = Case(
        MCORE_TO_HF, ["--load", str(d), "--save", str(out)], out,
        (str(d / "model_config.json"), "not found", "checkpoint"),
    )

    # 8b. a checkpoint with its config but with a data file gone (a copy cut short)
    d = copy_dir(mc_dense, root / "incomplete-checkpoint")
    gone = sorted(d.glob("*.distcp"))[0]
    gone.unlink()
    out = root / "out-incomplete-ckpt"
    cases["incomplete_checkpoint"] = Case(
        MCORE_TO_HF, ["--load", str(d), "--save", str(out)], out, (str(gone), "missing")
    )

    # 9. upcycling what is already a MoE
    out = root / "out-upcycle-moe"
    cases["already_moe"] = Case(
        UPCYCLE, ["--load", str(mc_moe), "--save", str(out)], out, (str(mc_moe), "already a MoE")
    )

    # 10. a good conversion
    out = root / "out-good"
    cases["good"] = Case(HF_TO_MCORE, ["--hf-dir", str(hf_dense), "--save", str(out)], out, ())
    return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory, hf_dense_dir, hf_moe_dir, mcore_dense_dir, mcore_moe_dir):
    cases = build_cases(
        tmp_path_factory.mktemp("bad-input"), hf_dense_dir, hf_moe_dir, mcore_dense_dir, mcore_moe_dir
    )
    # Slowest (the good conversion) first, so it does not end the run alone.
    order = sorted(cases, key=lambda n: n != "good")
    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        procs = pool.map(lambda n: run_tool(cases[n].tool, *cases[n].args, timeout=300), order)
        for name, proc in zip(order, procs):
            cases[name].proc = proc
    return cases


def describe(case: Case) -> str:
    p = case.proc
    return f"{case.tool} {' '.join(case.args)} -> {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"


def assert_user_error(case: Case) -> str:
    """The run failed the way a user error should; returns the error line."""
    p, why = case.proc, describe(case)
    assert p.returncode == 1, why
    assert "Traceback" not in p.stderr, why
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"want one final error line\n{why}"
    for name in case.names:
        assert name in errors[0], f"{name!r} not named\n{why}"
    assert "wrote" not in p.stdout, why
    assert not incomplete_path(case.out).exists(), why
    if case.existing is None:
        assert not case.out.exists(), why
    else:  # the folder that was there is exactly as it was
        assert case.out.is_dir() and snapshot(case.out) == case.existing, why
    return errors[0]


@pytest.mark.parametrize(
    "name",
    [
        "truncated",
        "no_weights",
        "missing_shard",
        "config_mismatch",
        "missing_tensor",
        "unsupported_arch",
        "exists_convert_hf_to_mcore",
        "exists_convert_mcore_to_hf",
        "exists_upcycle",
        "not_checkpoint",
        "incomplete_checkpoint",
        "already_moe",
    ],
)
def test_bad_input_is_a_one_line_error(runs, name):
    assert_user_error(runs[name])


def test_good_conversion_leaves_only_the_output(runs):
    case = runs["good"]
    assert case.proc.returncode == 0, describe(case)
    assert "Traceback" not in case.proc.stderr, describe(case)
    assert f"wrote {case.out}" in case.proc.stdout
    assert (case.out / "model_config.json").is_file() and (case.out / "metadata.json").is_file()
    assert not incomplete_path(case.out).exists()
    assert not [p for p in case.out.parent.iterdir() if p.name.endswith(".incomplete")]


# -- the same validation, in-process (cheap extra cases) ----------------------------------


def _check(hf_dir: Path):
    """What hf_to_mcore validates before building a model."""
    from megatron_bar.convert import check_hf_tensors
    from megatron_bar.convert.hf_io import SafetensorsReader, model_config_from_hf, read_hf_config

    source = str(hf_dir / "config.json")
    cfg = model_config_from_hf(read_hf_config(hf_dir), source)
    check_hf_tensors(SafetensorsReader(hf_dir), cfg, source)


@pytest.mark.parametrize(
    "fixture, changes, key",
    [
        ("hf_dense_dir", {"num_key_value_heads": 4}, "model.layers.0.self_attn.k_proj.weight"),
        ("hf_dense_dir", {"hidden_size": 32, "head_dim": 16}, "model.embed_tokens.weight"),
        ("hf_moe_dir", {"intermediate_size": 48}, "model.layers.0.mlp.experts.0.gate_proj.weight"),
    ],
)
def test_config_mismatch_names_the_tensor(request, tmp_path, fixture, changes, key):
    from megatron_bar.convert import HFFormatError

    d = copy_dir(request.getfixturevalue(fixture), tmp_path / "hf")
    edit_config(d, **changes)
    with pytest.raises(HFFormatError, match="config does not match") as e:
        _check(d)
    assert repr(key) in str(e.value)


def test_unexpected_tensor_is_named(hf_dense_dir, tmp_path):
    from megatron_bar.convert import HFFormatError

    d = copy_dir(hf_dense_dir, tmp_path / "hf")
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.bias"] = tensors["model.norm.weight"].clone()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(HFFormatError, match=r"'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        _check(d)


def test_expert_count_mismatch_names_a_missing_tensor(hf_moe_dir, tmp_path):
    from megatron_bar.convert import HFFormatError

    d = copy_dir(hf_moe_dir, tmp_path / "hf")
    edit_config(d, num_experts=6)
    with pytest.raises(HFFormatError, match=r"missing, first 'model\.layers\.0\.mlp\.experts\.4\."):
        _check(d)


def test_index_that_points_at_the_wrong_shard(hf_dense_dir, tmp_path):
    from megatron_bar.convert import HFFormatError

    d = copy_dir(hf_dense_dir, tmp_path / "hf")
    shards = shard_in_two(d)
    shutil.copy(shards[0], shards[1])  # shard 2 now holds shard 1's tensors
    with pytest.raises(HFFormatError, match="does not contain tensor") as e:
        _check(d)
    assert str(shards[1]) in str(e.value)


def test_truncated_shard_is_named(hf_dense_dir, tmp_path):
    from megatron_bar.convert import HFFormatError

    d = copy_dir(hf_dense_dir, tmp_path / "hf")
    shards = shard_in_two(d)
    os.truncate(shards[0], shards[0].stat().st_size - 8)
    with pytest.raises(HFFormatError, match="unreadable safetensors") as e:
        _check(d)
    assert str(shards[0]) in str(e.value)


@pytest.mark.parametrize(
    "text, match",
    [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"), (None, "not found")],
)
def test_bad_config_json(hf_dense_dir, tmp_path, text, match):
    from megatron_bar.convert.hf_io import HFFormatError, read_hf_config

    d = copy_dir(hf_dense_dir, tmp_path / "hf")
    if text is None:
        (d / "config.json").unlink()
    else:
        (d / "config.json").write_text(text)
    with pytest.raises(HFFormatError, match=match) as e:
        read_hf_config(d)
    assert str(d / "config.json") in str(e.value)


@pytest.mark.parametrize(
    "damage, match",
    [
        ("truncate_distcp", "truncated"),
        ("drop_common", "common.pt: missing"),
        ("drop_metadata", r"\.metadata: not found"),
        ("drop_marker", "metadata.json: not found"),
    ],
)
def test_damaged_checkpoint_is_named(mcore_dense_dir, tmp_path, damage, match):
    from megatron_bar.convert import check_checkpoint_files
    from megatron_bar.model.config import ConfigError

    d = copy_dir(mcore_dense_dir, tmp_path / "ckpt")
    check_checkpoint_files(d)  # the intact copy passes
    if damage == "truncate_distcp":
        f = sorted(d.glob("*.distcp"))[-1]
        os.truncate(f, f.stat().st_size // 2)
    else:
        {"drop_common": d / "common.pt", "drop_metadata": d / ".metadata",
         "drop_marker": d / "metadata.json"}[damage].unlink()
    with pytest.raises(ConfigError, match=match) as e:
        check_checkpoint_files(d)
    assert str(d) in str(e.value)


def test_atomic_output_dir_leaves_nothing_on_error(tmp_path):
    final = tmp_path / "out"
    stale = incomplete_path(final)
    stale.mkdir()
    (stale / "from-a-killed-run").write_text("x")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_output_dir(final) as tmp:
            assert tmp == stale and not (tmp / "from-a-killed-run").exists()
            (tmp / "half-written").write_text("x")
            raise RuntimeError("boom")
    assert not final.exists() and not stale.exists()


def test_good_hf_folder_passes_validation(hf_dense_dir, hf_moe_dir):
    for d in (hf_dense_dir, hf_moe_dir):
        _check(d)
