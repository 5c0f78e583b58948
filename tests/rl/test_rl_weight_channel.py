"""The weight-sync channel (megatron_bar/rl/channel.py) on its own and inside the Ray fleet.

On its own, with receivers in other processes: mixed-dtype buckets arrive bit for bit, and
a receiver still waiting on a broadcast fails as soon as rank 0 drops the group (not at the
group's timeout) - what the fleet relies on to rebuild the group after a death.

In the fleet, with 2 workers: after a push every worker's tensors equal the trainer's bits,
tensor by tensor; a push after moving one expert puts exactly the changed tensors' bytes on
the wire (counted by the sender and by each receiver); no tensor goes through Ray during a
sync (``ray.put`` is never called and no Ray call carries a tensor); and a worker killed
between syncs makes the next push rebuild the group and give every worker the whole model.
"""

import multiprocessing as mp
import os
import pickle
import signal

import pytest
import torch

from helpers import perturbed_policy
from megatron_bar.convert.hf_io import hf_config_from_model_config
from megatron_bar.rl.channel import Bucket, WeightReceiver, WeightSender, plan_buckets
from megatron_bar.rl.fleet import FleetConfig, RolloutFleet
from megatron_bar.rl.weights import gather_hf_state_dict


def _mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(3, 5, generator=g),
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.randint(-2**40, 2**40, (4, 2), generator=g),
        "d": torch.randn(2, 2, 2, generator=g),
        "e": torch.randn(6, generator=g).to(torch.bfloat16),
    }


def test_plan_buckets_group_by_dtype_and_split_at_the_limit():
    state = _mixed_state()
    buckets = plan_buckets(state, limit_bytes=15 * 4)  # "a" (60 bytes) fills a float32 bucket
    assert [(b.dtype, b.names) for b in buckets] == [
        ("float32", ("a",)), ("float32", ("d",)), ("bfloat16", ("b", "e")), ("int64", ("c",))]
    assert sum(b.nbytes for b in buckets) == sum(t.numel() * t.element_size() for t in state.values())
    assert buckets[0].shapes == ((3, 5),)


def _receiver(address, rank, buckets, queue, mode):
    targets = {n: torch.zeros(s, dtype=getattr(torch, b.dtype)) for b in buckets for n, s in zip(b.names, b.shapes)}
    channel = WeightReceiver(address, rank)
    try:
        received = channel.receive(buckets, targets)
        if mode == "wait_again":  # a broadcast rank 0 never sends
            channel.receive(buckets, targets)
        queue.put((rank, received, targets))
    except RuntimeError as e:
        queue.put((rank, "error", str(e)))


def _start(address, buckets, mode="once"):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_receiver, args=(address, r, buckets, queue, mode)) for r in (1, 2)]
    for p in procs:
        p.start()
    return queue, procs


def test_mixed_dtype_buckets_arrive_bit_for_bit():
    state = _mixed_state()
    buckets = plan_buckets(state, limit_bytes=40)
    sender = WeightSender("127.0.0.1", 0, workers=2, backend="gloo", timeout_s=120)
    address = sender.next_address()
    queue, procs = _start(address, buckets)
    try:
        sender.connect(address)
        sent = sender.send(state, buckets)
        results = sorted(queue.get(timeout=120) for _ in procs)
    finally:
        sender.close()
        for p in procs:
            p.join(timeout=60)
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert sent == total
    for rank, received, targets in results:
        assert received == total, (rank, received)
        for name, tensor in state.items():
            assert targets[name].dtype == tensor.dtype and torch.equal(targets[name], tensor), name


def test_a_receiver_left_waiting_fails_when_rank_0_drops_the_group():
    state = {"a": torch.ones(4)}
    buckets = plan_buckets(state, 1e9)
    sender = WeightSender("127.0.0.1", 0, workers=2, backend="gloo", timeout_s=3600)
    address = sender.next_address()
    queue, procs = _start(address, buckets, mode="wait_again")
    try:
        sender.connect(address)
        sender.send(state, buckets)
        sender.close()
        results = sorted(queue.get(timeout=300) for _ in procs)  # well inside the group's hour
    finally:
        for p in procs:
            p.join(timeout=60)
    assert [r[:2] for r in results] == [(1, "error"), (2, "error")]
    assert all("Timed out" not in r[2] for r in results), results


# -- in the fleet -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def policy(tiny_base):
    return perturbed_policy(tiny_base["bar2"], scale=0.05, seed=1)


@pytest.fixture(scope="module")
def fleet(policy):
    fleet = RolloutFleet(hf_config_from_model_config(policy.config, torch.float32),
                         FleetConfig(num_workers=2, timeout_s=120, sync_bucket_mb=0.05))
    yield fleet
    fleet.shutdown()


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _assert_workers_hold(fleet, state):
    for worker in (0, 1):
        held = fleet.worker_weights(worker, list(state))
        for name, tensor in state.items():
            assert held[name].dtype == tensor.dtype and torch.equal(held[name], tensor), (worker, name)


def test_after_a_push_every_worker_holds_the_trainers_bits(policy, fleet):
    state = gather_hf_state_dict(policy.gpt, policy.config)
    fleet.push_weights(state, version=1)
    sync = fleet.last_sync
    assert sync["backend"] == "gloo" and sync["buckets"] > 1  # 0.05 MB buckets: several
    assert sync["bytes_sent"] == _nbytes(state.values()) and sync["bytes_received"] == [sync["bytes_sent"]] * 2
    _assert_workers_hold(fleet, state)


def test_a_push_sends_exactly_the_changed_bytes_and_nothing_through_ray(policy, fleet, monkeypatch):
    import ray

    before = {k: v.clone() for k, v in gather_hf_state_dict(policy.gpt, policy.config).items()}
    fleet.push_weights(before, version=2)  # whatever the earlier tests left: now the workers hold `before`
    with torch.no_grad():
        for name, p in policy.gpt.named_parameters():
            if "local_experts.1.linear_fc2" in name:
                p.add_(0.01 * torch.randn_like(p))
    after = gather_hf_state_dict(policy.gpt, policy.config)
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert 0 < len(changed) < len(after) / 4

    puts, calls = [], []
    monkeypatch.setattr(ray, "put", lambda *a, **k: puts.append(a))
    originals = list(fleet.workers)
    fleet.workers[:] = [_Recording(w, calls) for w in originals]
    try:
        fleet.push_weights(after, version=3)
    finally:
        fleet.workers[:] = originals
    sync = fleet.last_sync
    expected = _nbytes(after[k] for k in changed)
    assert sync["tensors"] == len(changed) and sync["bytes"] == expected
    assert sync["bytes_sent"] == expected and sync["bytes_received"] == [expected, expected]
    assert not puts
    assert [c[0] for c in calls] == ["receive_weights", "receive_weights"]
    for _, args, kwargs in calls:
        assert not _has_tensor((args, kwargs))
    assert sum(len(pickle.dumps(c[1:])) for c in calls) < expected / 10  # the layout only
    _assert_workers_hold(fleet, after)


def test_a_worker_killed_between_syncs_rejoins_with_the_whole_model(policy, fleet):
    restarts = fleet.restarts_seen
    os.kill(fleet.worker_pids()[1], signal.SIGKILL)
    with torch.no_grad():
        for name, p in policy.gpt.named_parameters():
            if "local_experts.1.linear_fc1" in name:
                p.add_(0.01 * torch.randn_like(p))
    state = gather_hf_state_dict(policy.gpt, policy.config)
    fleet.push_weights(state, version=4)
    assert fleet.last_sync.get("rejoined") and fleet.restarts_seen > restarts
    _assert_workers_hold(fleet, state)
    rollouts = fleet.generate([[1, 5, 6, 7]], 2, 1.0, 6, eos_id=2, pad_id=3, seed=0)
    assert {r["version"] for r in rollouts} == {4}


class _Recording:
    """An actor handle whose method calls are recorded (name, args, kwargs) before they go."""

    def __init__(self, handle, calls):
        self._handle, self._calls = handle, calls

    def __getattr__(self, method):
        target = getattr(self._handle, method)
        calls = self._calls

        class _Method:
            @staticmethod
            def remote(*args, **kwargs):
                calls.append((method, args, kwargs))
                return target.remote(*args, **kwargs)

        return _Method()


def _has_tensor(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return any(_has_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(v) for v in obj)
    if isinstance(obj, Bucket):
        return False
    return hasattr(obj, "__dict__") and _has_tensor(vars(obj))
