"""The environment ``tokenmill router`` / ``serve --data-parallel-size`` gives its local replicas."""
from __future__ import annotations

from tokenmill.commands.router import replica_env


def test_replicas_share_the_cores_and_wait_passively():
    env = replica_env(4, {"PATH": "/bin"}, cpus=2)
    assert env == {"PATH": "/bin", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    assert replica_env(2, {}, cpus=16)["OMP_NUM_THREADS"] == "8"


def test_what_the_user_set_wins():
    env = replica_env(4, {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE"}, cpus=2)
    assert env["OMP_NUM_THREADS"] == "3" and env["OMP_WAIT_POLICY"] == "ACTIVE"


def test_routing_to_running_replicas_changes_nothing():
    assert replica_env(0, {"A": "1"}) == {"A": "1"}
