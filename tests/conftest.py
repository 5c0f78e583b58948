import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import tiny_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_dense_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "olmo2"
    tiny_hf_model(moe=False).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def hf_moe_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "flexolmo"
    tiny_hf_model(moe=True).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def mcore_dense_dir(hf_dense_dir, tmp_path_factory):
    from megatron_bar.convert import hf_to_mcore

    d = tmp_path_factory.mktemp("mcore") / "olmo2"
    hf_to_mcore(hf_dense_dir, d)
    return d


@pytest.fixture(scope="session")
def mcore_moe_dir(hf_moe_dir, tmp_path_factory):
    from megatron_bar.convert import hf_to_mcore

    d = tmp_path_factory.mktemp("mcore") / "flexolmo"
    hf_to_mcore(hf_moe_dir, d)
    return d


# The tiny default (megatron_bar.demo): shared by the train, bar and rl tests; never modify.
@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> dict[str, Path]:
    from megatron_bar.demo.tiny import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> dict[str, Path]:
    from megatron_bar.demo.toy_data import write_toy_sets

    return write_toy_sets(tmp_path_factory.mktemp("toy-data"))


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (``helpers.SmallDisk``): disk-full tests skip where mounting is not allowed."""
    from helpers import SmallDisk

    disk = SmallDisk(tmp_path / "small-disk", size_kib=64)
    why = disk.mount()
    if why:
        pytest.skip(why)
    try:
        yield disk.root
    finally:
        disk.unmount()
