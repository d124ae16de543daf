"""Tensor parallelism across machines: the other ranks as Ray actors on a running Ray cluster.

As with vLLM, the cluster is the user's (``ray start --head`` on one node, ``ray start
--address=HEAD:6379`` on the others, or ``RAY_ADDRESS``); tokenmill connects to it,
reserves one bundle per remote rank in a placement group (packed onto as few nodes as
have room, spilling to others) and starts a :class:`~tokenmill.executor.worker.Worker` in
each. Rank 0 stays in the engine process, on its node; the collectives run over
``torch.distributed`` with the platform's backend, the control messages over Ray calls.
Across real machines, gloo may need ``GLOO_SOCKET_IFNAME`` (NCCL: ``NCCL_SOCKET_IFNAME``) set
to the interface the nodes reach each other on.
"""
from __future__ import annotations

import logging
import os

from tokenmill.executor.interface import Executor, RankDied
from tokenmill.executor.multiproc import free_port

log = logging.getLogger(__name__)

INSTALL_HINT = "the ray executor needs Ray: pip install 'tokenmill[ray]'"


def _import_ray():
    try:
        import ray
    except ImportError as exc:
        raise ValueError(f"distributed_executor_backend 'ray': {INSTALL_HINT}") from exc
    return ray


class _RayRank:
    """The body of one Ray actor: a Worker built on request."""

    def start(self, config, rank: int, size: int, init_method: str) -> str:
        from tokenmill.executor.worker import Worker

        self.worker = Worker(config, rank, size, init_method, local_rank=0)
        import ray

        return ray.get_runtime_context().get_node_id()

    def call(self, method: str, *args) -> None:
        self.worker.call(method, *args)  # rank 0's result is the one used

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


class RayExecutor(Executor):
    """Rank 0 here; ranks 1..N-1 as Ray actors placed by a placement group."""

    def __init__(self, config, plugin_manager=None):
        ray = _import_ray()
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from tokenmill.executor.worker import Worker
        from tokenmill.plugins import get_plugin_manager

        size = config.parallel.tensor_parallel_size
        self.timeout = config.parallel.distributed_timeout
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
        pm = plugin_manager or get_plugin_manager()
        resource = pm.select_platform(config.device).ray_resource
        options = {"num_cpus": 1} if resource == "CPU" else {"num_gpus": 1} if resource == "GPU" \
            else {"num_cpus": 0, "resources": {resource: 1}}
        self.actors = []
        self.pg = placement_group([{resource: 1}] * (size - 1), strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=self.timeout)
        except Exception as exc:
            ray.util.remove_placement_group(self.pg)
            raise RankDied(f"the Ray cluster has no room for {size - 1} tensor-parallel rank(s) of 1 {resource} "
                           f"each within {self.timeout:.0f} s (cluster resources: {ray.cluster_resources()})") from exc
        host = ray.util.get_node_ip_address()
        init_method = f"tcp://{host}:{free_port(host)}"
        try:
            cls = ray.remote(_RayRank)
            for i in range(size - 1):
                strategy = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)
                self.actors.append(cls.options(scheduling_strategy=strategy, **options).remote())
            starts = [a.start.remote(config, r, size, init_method) for r, a in enumerate(self.actors, start=1)]
            self.worker = Worker(config, 0, size, init_method, plugin_manager=pm)
            self.node_ids = [ray.get_runtime_context().get_node_id(), *self._get(starts)]
        except BaseException:
            self.shutdown()
            raise
        self.driver = self.worker.runner
        log.info("executor: %d tensor-parallel ranks on Ray nodes %s", size, self.node_ids)

    def _get(self, futures):
        import ray

        try:
            return ray.get(futures, timeout=self.timeout)
        except ray.exceptions.GetTimeoutError as exc:
            raise RankDied(f"a tensor-parallel Ray actor did not answer within {self.timeout:.0f} s") from exc
        except ray.exceptions.RayError as exc:
            raise RankDied(f"a tensor-parallel Ray actor failed: {exc}") from exc

    def _all(self, method: str, *args):
        futures = [a.call.remote(method, *args) for a in self.actors]
        try:
            out = getattr(self.worker, method)(*args)
        except RuntimeError as exc:
            raise RankDied(f"tensor-parallel step failed on rank 0: {exc}") from exc
        self._get(futures)
        return out

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if getattr(self, "pg", None) is not None:
            ray.util.remove_placement_group(self.pg)
            self.pg = None
        worker = getattr(self, "worker", None)
        if worker is not None:
            worker.shutdown()
