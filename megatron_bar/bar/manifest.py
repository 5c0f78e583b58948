"""``bar_manifest.json``: what a merged BAR checkpoint is made of (experts by name, their
sources and content hashes, averaging, divergence report, history). Reading and finding
it needs nothing heavy: the model, training and serving code import this module."""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST_FILE = "bar_manifest.json"
MANIFEST_FORMAT = "megatron_bar.bar_manifest/1"
ANCHOR_NAME = "anchor"


class ManifestError(ValueError):
    pass


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{directory}: no {MANIFEST_FILE} - not a checkpoint made by merge_experts")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("experts"), list):
        raise ManifestError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def run_start(ckpt: str | Path) -> Path | None:
    """The checkpoint a training run started from, for a checkpoint inside that run
    (``<run>/checkpoints/iter_N``: the run's ``config.json`` names it)."""
    config = Path(ckpt).parent.parent / "config.json"
    if not config.is_file():
        return None
    try:
        load = json.loads(config.read_text()).get("model", {}).get("load")
    except (json.JSONDecodeError, AttributeError):
        return None
    return Path(load) if load else None


def find_manifest(path: str | Path) -> Path | None:
    """The folder holding the manifest for checkpoint ``path``: itself, else the merged
    checkpoint its training run started from (a router-stage checkpoint carries none)."""
    for candidate in (Path(path), run_start(path)):
        if candidate is not None and (candidate / MANIFEST_FILE).is_file():
            return candidate
    return None


def expert_names(path: str | Path, num_experts: int) -> list[str]:
    """``["anchor", <name of expert 1>, ...]`` from the manifest of ``path`` (see
    :func:`find_manifest`); ``expert<e>`` where there is none or it lists other experts."""
    where = find_manifest(path)
    if where is not None:
        experts = sorted(read_manifest(where)["experts"], key=lambda e: e["index"])
        names = [ANCHOR_NAME] + [e["name"] for e in experts]  # the manifest lists 1..N
        if len(names) == num_experts:
            return names
    return [ANCHOR_NAME] + [f"expert{e}" for e in range(1, num_experts)]
