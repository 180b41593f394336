"""The Ray executor across two Ray nodes on one machine (``ray.cluster_utils.Cluster``: a head
node and a second node, each with one CPU and its own custom resource, ``node_a`` / ``node_b``,
so placement is observable). The engine joins the cluster through ``RAY_ADDRESS`` as it would
on a real cluster; with one CPU a node the two ranks of -tp 2 and of -pp 2 must land on
different nodes (gloo over TCP, no shared memory), and their greedy tokens must equal one
rank's."""
from __future__ import annotations

import os

import pytest

ray = pytest.importorskip("ray")

from pagedllm import LLM, SamplingParams  # noqa: E402
from pagedllm.executor.ray_executor import RayExecutor  # noqa: E402
from tests.utils.tiny_models import build_tiny_model  # noqa: E402

PROMPTS = ["The for statement", "A class is", "def f(x):", "import os"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = dict(device="cpu", num_gpu_blocks_override=64, max_model_len=256)
NODE_RESOURCES = ("node_a", "node_b")


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head node ({"node_a": 1}, where the engine's driver connects) and a second node
    ({"node_b": 1}), one CPU each; RAY_ADDRESS points at the head while the module runs."""
    from ray.cluster_utils import Cluster
    if ray.is_initialized():  # another module's cluster: this module brings its own
        ray.shutdown()
    node = dict(num_cpus=1, object_store_memory=80 << 20)
    old_address = os.environ.get("RAY_ADDRESS")
    cluster = Cluster()
    try:
        cluster.add_node(resources={"node_a": 1}, include_dashboard=False, **node)
        cluster.add_node(resources={"node_b": 1}, **node)
        cluster.wait_for_nodes()
        os.environ["RAY_ADDRESS"] = cluster.address
        yield cluster
    finally:
        if old_address is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old_address
        ray.shutdown()
        cluster.shutdown()


def rank_node(worker) -> tuple[str, list[str]]:
    """The Ray node a rank runs on: its id and its custom node_a / node_b resources."""
    node_id = ray.get_runtime_context().get_node_id()
    resources = next(n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id)
    return node_id, sorted(r for r in resources if r in NODE_RESOURCES)


def _generate(llm):
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_ray_two_nodes_tp_and_pp_greedy_tokens_equal_one_rank(two_node_cluster):
    path = build_tiny_model("qwen2")
    llm = LLM(model=str(path), **ENGINE)
    ref = _generate(llm)
    del llm
    for parallel in (dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)):
        llm = LLM(model=str(path), distributed_executor_backend="ray", **parallel, **ENGINE)
        executor = llm.llm_engine.executor
        try:
            assert isinstance(executor, RayExecutor) and len(executor.actors) == 1
            # joined the module's cluster through RAY_ADDRESS (no local cluster started)
            assert len(ray.nodes()) == 2
            assert _generate(llm) == ref, parallel
            (node0, res0), (node1, res1) = executor.collective_rpc(rank_node)
            # rank 0 runs in the engine process on the head node, rank 1 on the other node
            assert (res0, res1) == (["node_a"], ["node_b"]), parallel
            assert node0 != node1 and executor.places[0][0] == node1
            assert not executor._shm_paths  # ranks on two nodes: gloo over TCP only
        finally:
            executor.shutdown()
        del llm, executor
