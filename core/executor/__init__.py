"""Executors: uniprocess, multiprocess and Ray (see :mod:`tokenmill.executor.interface`)."""
from __future__ import annotations

from tokenmill.executor.interface import Executor, RankDied, UniprocExecutor


def make_executor(config, plugin_manager=None) -> Executor:
    """The executor ``config.parallel`` asks for, started (every rank loaded)."""
    backend = config.parallel.executor_backend
    size = config.parallel.tensor_parallel_size
    if size > 1:  # refuse a model the ranks cannot split before starting any of them
        from tokenmill.executor.parallel import TensorParallelGroup
        from tokenmill.models.loader import load_config
        from tokenmill.models.tensor_parallel import local_sizes

        hf_config = load_config(config.model.model)
        local_sizes(hf_config, TensorParallelGroup(0, size))
        experts = getattr(hf_config, "num_local_experts", None)
        if experts and hf_config.intermediate_size % size:
            raise ValueError(f"tensor_parallel_size {size} does not divide the experts' intermediate size "
                             f"({hf_config.intermediate_size})")
    if backend == "uni":
        return UniprocExecutor(config, plugin_manager)
    if backend == "mp":
        from tokenmill.executor.multiproc import MultiprocExecutor

        return MultiprocExecutor(config, plugin_manager)
    from tokenmill.executor.ray_executor import RayExecutor

    return RayExecutor(config, plugin_manager)


__all__ = ["Executor", "RankDied", "UniprocExecutor", "make_executor"]
