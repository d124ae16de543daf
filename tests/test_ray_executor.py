"""The Ray executor: TP=2 with the second rank on another node of a local two-node Ray cluster.

The cluster is started the way Ray's own tests do (``ray.cluster_utils.Cluster``): a head
node with no CPUs to give, so the one-CPU rank bundle can only be placed on the second
node, while rank 0 stays in this process on the head node.
"""
from __future__ import annotations

import sys

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.testing import make_tiny_model

ray = pytest.importorskip("ray", reason="Ray is a dev dependency (tokenmill[ray])")

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(monkeypatch_module):
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    monkeypatch_module.setenv("RAY_ADDRESS", c.address)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_tp2_across_two_ray_nodes_equals_tp1(cluster):
    path = make_tiny_model("qwen3")  # one KV head: replicated on both ranks
    gen = torch.Generator().manual_seed(5)
    prompts = [[1] + torch.randint(4, 512, (n,), generator=gen).tolist() for n in (4, 30)]
    expected = [o.outputs[0].token_ids for o in LLM(str(path), num_blocks=32).generate(prompts, GREEDY)]
    llm = LLM(str(path), num_blocks=32, tensor_parallel_size=2, distributed_executor_backend="ray",
              distributed_timeout=120)
    try:
        head, other = llm.engine.executor.node_ids
        assert head != other, "rank 1 must run on the second node"
        assert head == ray.get_runtime_context().get_node_id()
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == expected
    finally:
        llm.engine.shutdown()


def test_without_ray_the_flag_says_how_to_install(monkeypatch):
    from tokenmill.config import EngineConfig
    from tokenmill.executor.ray_executor import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", None)
    config = EngineConfig.from_kwargs(str(make_tiny_model("llama")), tensor_parallel_size=2,
                                      distributed_executor_backend="ray")
    with pytest.raises(ValueError, match=r"pip install 'tokenmill\[ray\]'"):
        RayExecutor(config)
