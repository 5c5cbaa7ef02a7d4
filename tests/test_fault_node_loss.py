"""Node loss on a simulated multi-node cluster: the trial moves on, continuing from its checkpoint."""

import os
import signal
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from sweeps.driver import _param_space, _trainable  # noqa: E402
from sweeps.spec import parse_sweep  # noqa: E402
from tests.ray_helpers import epochs_of, sweep_file  # noqa: E402

CLUSTER: dict = {}  # module global: the callback is pickled, the Cluster object must not be


class KillTrialNode(tune.Callback):
    """Remove the node a trial runs on once it has reported epoch 3, its processes dying with it."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("epoch") == 3 and not CLUSTER.get("killed"):
            for node in CLUSTER["workers"]:
                if node.node_id == result["node_id"]:
                    CLUSTER["killed"] = node.node_id
                    CLUSTER["cluster"].remove_node(node, allow_graceful=False)
                    # the trial's worker notices its raylet is gone only after a while, and a fast
                    # trial would finish there first; on a real node loss it dies with the node
                    try:
                        os.kill(result["pid"], signal.SIGKILL)
                    except ProcessLookupError:
                        pass


@pytest.fixture
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, connect=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2}})
    CLUSTER.update(cluster=c, workers=[c.add_node(num_cpus=1) for _ in range(2)])
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()
    CLUSTER.clear()


def test_trial_survives_node_loss(cluster, tmp_path):
    spec = parse_sweep(sweep_file(tmp_path, "nodes", evaluation={"genotypes": ["DARTS_V2"], "layers": [1],
                                                                 "epochs": 10, "max_steps_per_epoch": 8}))
    genotypes = {"DARTS_V2": {"genotype": spec.eval.axes["genotypes"]["DARTS_V2"]}}
    start = time.time()
    space = _param_space(spec.eval, genotypes)
    result = tune.Tuner(_trainable(spec.eval, genotypes), param_space=space, run_config=tune.RunConfig(
        name="eval", storage_path=str(tmp_path), verbose=0, callbacks=[KillTrialNode()],
        failure_config=tune.FailureConfig(max_failures=3))).fit()[0]
    assert CLUSTER.get("killed"), "the trial's node was never removed"
    assert result.error is None and result.metrics["epoch"] == 10
    assert result.metrics["node_id"] != CLUSTER["killed"]  # finished elsewhere
    epochs = epochs_of(Path(result.path))
    assert sorted(set(epochs)) == list(range(1, 11))  # none missing
    assert epochs.count(1) == 1  # continued from a checkpoint, never restarted from epoch 1
    assert time.time() - start < 120
