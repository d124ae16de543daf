"""The executor: how the engine core reaches the ranks that run the model.

The engine core owns the scheduler and the KV manager and talks to the model only through
an :class:`Executor`. An executor holds rank 0 in the engine's own process (its
:attr:`driver` is the rank-0 :class:`~tokenmill.engine.model_runner.ModelRunner`, whose
output is the step's result) and, for tensor parallelism, the other ranks wherever its
backend puts them: nowhere (``uni``), local worker processes (``mp``) or Ray actors
(``ray``). Each step's :class:`~tokenmill.engine.batch.SchedulerOutput` goes to every rank
unchanged (it is a compact, picklable message), and every rank executes it.
"""
from __future__ import annotations


class RankDied(RuntimeError):
    """A tensor-parallel rank is gone or failed; the engine cannot step any more."""


class Executor:
    """Runs the model on ``tensor_parallel_size`` ranks; rank 0 lives in this process."""

    #: The rank-0 model runner (in this process).
    driver = None

    def _all(self, method: str, *args):
        """Call :class:`~tokenmill.executor.worker.Worker` ``method`` on every rank; returns rank 0's result."""
        raise NotImplementedError

    def num_kv_blocks(self, max_needed: int) -> int:
        """KV blocks every rank can hold (each rank's budget, the smallest wins), at most ``max_needed``."""
        return self._all("num_kv_blocks", max_needed)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Allocate ``num_blocks`` blocks on every rank (each rank holds its own KV heads)."""
        self._all("allocate_kv_cache", num_blocks)

    def num_swap_blocks(self, max_needed: int) -> int:
        """Host swap slots every rank can hold (``swap_space`` over its block size), at most ``max_needed``."""
        return self._all("num_swap_blocks", max_needed)

    def allocate_swap_space(self, num_slots: int) -> None:
        """Allocate ``num_slots`` host blocks on every rank for swapped-out KV (its own shard)."""
        self._all("allocate_swap_space", num_slots)

    def execute(self, plan):
        """Run one step on every rank; returns rank 0's ``RunnerOutput``. Raises :class:`RankDied`."""
        return self._all("execute", plan)

    def submit(self, plan):
        """Start :meth:`execute` of ``plan`` on the executor's step thread; returns a ``Future``.

        Steps submitted run one at a time in submission order (the runner applies each plan to
        its per-sequence state), so the overlap scheduler can prepare the next plan meanwhile.
        Mixing :meth:`execute` and :meth:`submit` is only safe once every submitted step is done."""
        pool = getattr(self, "_step_thread", None)
        if pool is None:
            from concurrent.futures import ThreadPoolExecutor

            pool = self._step_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-step")
        return pool.submit(self.execute, plan)

    def close_step_thread(self) -> None:
        """Wait for submitted steps and stop the step thread (a later :meth:`submit` starts a new one)."""
        pool = getattr(self, "_step_thread", None)
        if pool is not None:
            pool.shutdown(wait=True)
            self._step_thread = None

    def check_health(self) -> None:
        """Raise :class:`RankDied` when a rank is gone (cheap; the engine calls it before each step)."""

    def shutdown(self) -> None:
        """Stop the other ranks and release the group; safe to call twice."""


class UniprocExecutor(Executor):
    """One rank, in this process: the model runner itself."""

    def __init__(self, config, plugin_manager=None):
        from tokenmill.executor.worker import Worker

        self.worker = Worker(config, 0, 1, None, plugin_manager=plugin_manager)
        self.driver = self.worker.runner

    def _all(self, method: str, *args):
        return self.worker.call(method, *args)
