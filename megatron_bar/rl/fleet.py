"""The rollout fleet: N rollout workers as Ray actors.

Ray runs locally by default (``ray.init`` on this machine) and joins an existing cluster
given its address (``rl.ray_address``, e.g. the head that ``slurm/math_rlvr.sh`` starts).
Workers are placed by a placement group (one bundle per worker, spread over nodes where
there are several) and restarted by Ray when they die; the fleet then rebuilds the
weight-sync group with every worker, gives them the whole current model, and retries the
lost share of the rollout. Every wait has a timeout that ends in a clear error - nothing
hangs. Weight pushes send only the tensors that changed since the last one, bucket by
bucket, by broadcast over the weight-sync channel (:mod:`megatron_bar.rl.channel`): Ray
carries only the layout (:meth:`RolloutFleet.push_weights`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from megatron_bar import platform
from megatron_bar.rl.channel import WeightSender, plan_buckets
from megatron_bar.utils.errors import UserError

log = logging.getLogger(__name__)


def _same(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(a.eq(b).all())


class RolloutError(UserError):
    pass


class _StaleWorker(Exception):
    """A worker answered with weights other than the ones pushed last."""


class _ChannelBroken(Exception):
    """A broadcast on the weight-sync group failed: a member died or left it."""


@dataclass
class FleetConfig:
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    threads_per_worker: int = 1
    ray_address: str | None = None  # None: start Ray on this machine
    timeout_s: float = 600.0  # any single wait on a worker
    max_retries: int = 2  # per rollout share, after a worker died
    max_restarts: int = 4  # per worker, by Ray
    sync_bucket_mb: float = 256.0  # weight sync: changed tensors go out in buckets of about this size
    sync_backend: str = "auto"  # the weight-sync group: auto (NCCL where all are on GPU, else gloo) | nccl | gloo
    sync_port: int = 0  # the weight-sync store's port on the trainer's node; 0: any free one
    engine: str = "transformers"  # the workers' class (megatron_bar.rl.engines.ENGINES)


class RolloutFleet:
    def __init__(self, worker_config: dict, cfg: FleetConfig):
        """``worker_config``: what the engine's worker is built from (the HF config for
        transformers, the ModelConfig dict for megatron: ``Engine.worker_config``)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from megatron_bar.rl.engines import check_engine

        self.cfg = cfg
        self._ray = ray
        self._own_ray = not ray.is_initialized()
        if self._own_ray:
            if cfg.ray_address:
                ray.init(address=cfg.ray_address, log_to_driver=False)
            else:
                ray.init(
                    # "local": a Ray of our own even when another one runs on this machine
                    # (ray.init() with no address would attach to that one)
                    address="local",
                    num_cpus=max(1, int(cfg.num_workers * cfg.cpus_per_worker + 1)),
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
        bundle = {"CPU": cfg.cpus_per_worker}
        if cfg.gpus_per_worker:
            bundle["GPU"] = cfg.gpus_per_worker
        self.placement = placement_group([dict(bundle) for _ in range(cfg.num_workers)], strategy="SPREAD")
        self._wait(self.placement.ready(), "placing the rollout workers (are the resources there?)")
        actor = ray.remote(check_engine(cfg.engine).worker_class())
        self.workers = [
            actor.options(
                num_cpus=cfg.cpus_per_worker,
                num_gpus=cfg.gpus_per_worker,
                max_restarts=cfg.max_restarts,
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.placement, placement_group_bundle_index=i
                ),
            ).remote(worker_config, cfg.threads_per_worker)
            for i in range(cfg.num_workers)
        ]
        self._pushed: dict = {}  # what every worker holds: a copy of the last push, by HF key
        self.version = -1
        self.restarts_seen = 0
        self.last_sync: dict = {}  # bytes / tensors / buckets / seconds of the last push
        self._lock = threading.RLock()  # the channel: pushes, and rejoins from a rollout thread
        self._pids: list[int | None] = [None] * cfg.num_workers  # as of the last rejoin
        self._channel = None
        try:
            self.sync_backend = platform.standalone_backend(cfg.sync_backend, cfg.gpus_per_worker > 0)
            # the store lives here (rank 0); the workers reach it at this node's address
            self._channel = WeightSender(ray.util.get_node_ip_address(), cfg.sync_port, cfg.num_workers,
                                         self.sync_backend, cfg.timeout_s)
            self._rejoin()
        except BaseException:
            self.shutdown()
            raise

    # -- waiting -------------------------------------------------------------------------

    def _wait(self, ref, what: str):
        try:
            return self._ray.get(ref, timeout=self.cfg.timeout_s)
        except self._ray.exceptions.GetTimeoutError:
            raise RolloutError(f"timed out after {self.cfg.timeout_s:.0f} s {what}") from None

    def _alive_pid(self, i: int) -> int:
        """Worker ``i``'s pid, once it answers (after Ray restarted it, if it died)."""
        deadline = time.monotonic() + self.cfg.timeout_s
        while True:
            try:
                return self._ray.get(self.workers[i].pid.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.ActorUnavailableError):
                if time.monotonic() > deadline:
                    raise RolloutError(f"rollout worker {i} did not come back within "
                                       f"{self.cfg.timeout_s:.0f} s") from None
                time.sleep(0.5)
            except self._ray.exceptions.GetTimeoutError:
                raise RolloutError(f"rollout worker {i} did not come back") from None

    def _rejoin(self) -> None:
        """Every worker (restarted ones included) into a new generation of the weight-sync
        group, and the whole model as last pushed to each. A group is rebuilt rather than
        patched: a restarted process is not in the old one, and a failed broadcast may have
        left the survivors with part of a push."""
        with self._lock:
            for attempt in range(self.cfg.max_retries + 1):
                pids = [self._alive_pid(i) for i in range(len(self.workers))]
                self.restarts_seen += sum(old is not None and old != new for old, new in zip(self._pids, pids))
                self._pids = pids
                try:
                    self._connect()
                    if self._pushed:
                        self._broadcast(self._pushed, self.version)
                    return
                except _ChannelBroken as e:
                    log.warning("the weight-sync group broke while being rebuilt (%s); again", e.__cause__)
            raise RolloutError(f"the weight-sync group could not be rebuilt in "
                               f"{self.cfg.max_retries + 1} attempts (rollout workers keep dying?)")

    def _connect(self) -> None:
        self._channel.close()  # a survivor still waiting on the old group fails now, not at the timeout
        address = self._channel.next_address()
        refs = [w.join_weight_channel.remote(address, i + 1) for i, w in enumerate(self.workers)]
        try:
            self._channel.connect(address)  # blocks until every worker has joined
            for i, r in enumerate(refs):
                self._wait(r, f"worker {i} joining the weight-sync group")
        except (RuntimeError, self._ray.exceptions.RayActorError, self._ray.exceptions.ActorUnavailableError) as e:
            self._channel.close()
            raise _ChannelBroken(str(e)) from e

    def _revive(self, i: int) -> None:
        """Worker ``i`` died (or answered from a fresh process): wait for Ray's restart, then
        rebuild the group with it and give every worker the current weights."""
        self._rejoin()
        log.warning("rollout worker %d was restarted and has the weights of version %d", i, self.version)

    # -- the interface -------------------------------------------------------------------

    def _broadcast(self, state: dict, version: int) -> dict:
        """``state`` to every worker: the layout through Ray, the tensors by broadcast."""
        buckets = plan_buckets(state, self.cfg.sync_bucket_mb * 2**20)
        generation = self._channel.generation
        # every worker gets the call, an empty one too: it carries the new version
        refs = [w.receive_weights.remote(generation, buckets, version) for w in self.workers]
        failure = None
        try:
            sent = self._channel.send(state, buckets)
        except RuntimeError as e:  # a member's connection closed, or the group's timeout
            failure = e
            self._channel.close()  # the others stop waiting for the rest of the broadcast
        received = []
        for i, r in enumerate(refs):
            try:
                received.append(self._wait(r, f"sending weights (worker {i})"))
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.ActorUnavailableError) as e:
                failure = failure or e
            except self._ray.exceptions.RayTaskError as e:
                if not isinstance(e.cause, RuntimeError):  # a real fault (a tensor it lacks), not the group
                    raise
                failure = failure or e
        if failure is not None:
            self._channel.close()
            raise _ChannelBroken(str(failure).splitlines()[0]) from failure
        return {"bytes_sent": sent, "bytes_received": received, "buckets": len(buckets)}

    def push_weights(self, hf_state: dict, version: int) -> None:
        """Only the tensors that changed since the last push go to the workers (in BAR's
        RLVR the anchor expert never does), by broadcast in buckets of ``sync_bucket_mb``;
        the fleet keeps a copy of what it pushed, to compare against and to give every
        worker the whole model after a restart."""
        with self._lock:
            t0 = time.perf_counter()
            changed = {k: v for k, v in hf_state.items() if k not in self._pushed or not _same(v, self._pushed[k])}
            self.version = version
            t1 = time.perf_counter()
            try:
                wire = self._broadcast(changed, version)
                wire["seconds_transfer"] = time.perf_counter() - t1
            except _ChannelBroken as e:
                log.warning("weight sync to the rollout workers failed (%s): rebuilding the group", e)
                wire = None
            for k, v in changed.items():
                self._pushed[k] = v.detach().clone()
            if wire is None:  # the whole model, as just pushed, to every worker
                self._rejoin()
                wire = {"bytes_sent": None, "bytes_received": [], "buckets": None, "rejoined": True,
                        "seconds_transfer": time.perf_counter() - t1}
            self.last_sync = {"bytes": sum(v.numel() * v.element_size() for v in changed.values()),
                              "tensors": len(changed), "tensors_unchanged": len(hf_state) - len(changed),
                              "seconds": time.perf_counter() - t0, "backend": self.sync_backend, **wire}

    def generate(self, prompts: list[list[int]], samples_per_prompt: int, temperature: float,
                 max_new_tokens: int, eos_id: int, pad_id: int, seed: int,
                 record_routing: bool = False) -> list[dict]:
        """Completions for every prompt, prompts split evenly over the workers (see
        :meth:`RolloutWorker.generate` for what each carries)."""
        shares = [list(range(i, len(prompts), len(self.workers))) for i in range(len(self.workers))]

        def launch(i):
            share = [prompts[j] for j in shares[i]]
            return self.workers[i].generate.remote(
                share, samples_per_prompt, temperature, max_new_tokens, eos_id, pad_id, seed * 1000 + i,
                record_routing,
            )

        pending = {i: launch(i) for i in range(len(self.workers)) if shares[i]}
        results: dict[int, list[dict]] = {}
        attempts = {i: 0 for i in pending}
        while pending:
            i, ref = next(iter(pending.items()))
            try:
                out = self._wait(ref, f"waiting for rollouts from worker {i}")
                stale = {r["version"] for r in out} - {self.version}
                if stale:
                    # Ray restarted the worker between our calls and ran the call on the
                    # fresh process, before it had the weights: its samples are not the policy's.
                    raise _StaleWorker(stale)
                for r in out:  # back to the caller's prompt numbering
                    r["prompt_index"] = shares[i][r["prompt_index"]]
                results[i] = out
                del pending[i]
            except (self._ray.exceptions.RayActorError, self._ray.exceptions.ActorUnavailableError,
                    _StaleWorker) as e:
                attempts[i] += 1
                if attempts[i] > self.cfg.max_retries:
                    raise RolloutError(f"rollout worker {i} died {attempts[i]} times in one step") from None
                if isinstance(e, _StaleWorker):
                    log.warning("rollout worker %d answered with weights of version %s, not %d: "
                                "it was restarted", i, sorted(e.args[0]), self.version)
                self._revive(i)
                pending[i] = launch(i)
        return [r for i in sorted(results) for r in results[i]]

    def worker_pids(self) -> list[int]:
        return [self._wait(w.pid.remote(), f"asking worker {i} for its pid") for i, w in enumerate(self.workers)]

    def logprobs(self, worker: int, prompt: list[int], completion: list[int], temperature: float = 1.0):
        return self._wait(self.workers[worker].logprobs.remote(prompt, completion, temperature),
                          f"log-probs from worker {worker}")

    def worker_weights(self, worker: int, names: list[str]) -> dict:
        """The named tensors as worker ``worker`` holds them (for checks)."""
        return self._wait(self.workers[worker].weights.remote(names), f"weights from worker {worker}")

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        self._channel.close()

        for w in self.workers:
            try:
                self._ray.kill(w)
            except Exception:
                pass
        try:
            remove_placement_group(self.placement)
        except Exception:
            pass
        if self._own_ray:
            self._ray.shutdown()
