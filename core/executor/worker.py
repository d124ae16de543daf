"""One tensor-parallel rank: its platform, its slice of the model and KV cache.

Every rank runs the same :class:`Worker` on the same step messages, so the ranks stay in
lockstep through the collectives inside the forward; only rank 0's
:class:`~tokenmill.engine.batch.RunnerOutput` is used (rank 0 samples and broadcasts the
tokens, so every rank appends the same ones to its sequence states).

Run as ``python -m tokenmill.executor.worker HOST:PORT RANK`` it is a worker process of the
multiprocess executor: it connects back to rank 0's control channel (authenticated with
``TOKENMILL_WORKER_AUTHKEY``), receives its configuration, and executes calls until told
to stop or until the channel closes (rank 0 gone).
"""
from __future__ import annotations

import logging
import os
import pickle
import sys

log = logging.getLogger(__name__)


class Worker:
    """Builds rank ``rank`` of ``size``: joins the group at ``init_method``, loads its shard."""

    def __init__(self, config, rank: int, size: int, init_method: str | None, local_rank: int | None = None,
                 plugin_manager=None):
        from tokenmill.engine.model_runner import ModelRunner
        from tokenmill.executor.parallel import init_group
        from tokenmill.models.loader import load_config
        from tokenmill.plugins import get_plugin_manager

        pm = plugin_manager or get_plugin_manager()
        self.rank = rank
        self.platform = pm.select_platform(config.device)
        self.tp = init_group(self.platform.dist_backend, init_method, rank, size,
                             config.parallel.distributed_timeout)
        try:
            hf_config = load_config(config.model.model)
            self.runner = ModelRunner(config, self.platform, pm, hf_config, tp=self.tp,
                                      device_index=rank if local_rank is None else local_rank)
        except BaseException:
            self.shutdown()  # a refused model must not leave this process's group behind for the next engine
            raise

    def num_kv_blocks(self, max_needed: int) -> int:
        """The pool every rank can hold: the smallest of the ranks' budgets (collective)."""
        return self.tp.min_int(self.runner.num_kv_blocks(max_needed))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.runner.allocate_kv_cache(num_blocks)

    def num_swap_blocks(self, max_needed: int) -> int:
        """The swap space every rank can hold: the smallest of the ranks' (collective)."""
        return self.tp.min_int(self.runner.num_swap_blocks(max_needed))

    def allocate_swap_space(self, num_slots: int) -> None:
        self.runner.allocate_swap_space(num_slots)

    def execute(self, plan):
        return self.runner.execute(plan)

    def call(self, method: str, *args):
        """Dispatch one control message (the executors' only entry point into a remote rank)."""
        return getattr(self, method)(*args)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _serve(address: str, rank: int) -> int:
    """The worker-process main loop: one reply per request, ``("stop",)`` or EOF ends it."""
    from multiprocessing.connection import Client

    host, port = address.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ.pop("TOKENMILL_WORKER_AUTHKEY")))
    conn.send_bytes(pickle.dumps(rank))
    config, size, init_method = pickle.loads(conn.recv_bytes())
    try:
        worker = Worker(config, rank, size, init_method)
    except BaseException as exc:
        conn.send_bytes(pickle.dumps(("error", f"rank {rank} failed to start: {type(exc).__name__}: {exc}")))
        return 1
    conn.send_bytes(pickle.dumps(("ok", None)))
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return 0  # rank 0 is gone
        if msg[0] == "stop":
            worker.shutdown()
            return 0
        try:
            worker.call(*msg)
            reply = ("ok", None)
        except BaseException as exc:
            log.exception("rank %d: %s failed", rank, msg[0])
            reply = ("error", f"rank {rank}: {msg[0]} failed: {type(exc).__name__}: {exc}")
        try:
            conn.send_bytes(pickle.dumps(reply))
        except OSError:
            return 0


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("TOKENMILL_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s %(levelname)s [rank {sys.argv[2]}] %(name)s: %(message)s")
    raise SystemExit(_serve(sys.argv[1], int(sys.argv[2])))
