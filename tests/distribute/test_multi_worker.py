"""MultiWorkerMirroredStrategy across two local processes (127.0.0.1, free ports)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).with_name("multi_worker_script.py")
TIMEOUT_S = 240


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.mark.parametrize("method", ["sam", "msam"])
def test_two_workers_train_to_identical_weights(method, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    processes = []
    try:
        for index in range(2):
            env = dict(os.environ)
            env["TF_CONFIG"] = json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}
            )
            env["PYTHONPATH"] = os.pathsep.join(
                [str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")]
            )
            processes.append(subprocess.Popen(
                [sys.executable, str(SCRIPT), method, str(tmp_path / f"w{index}.npz")],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            ))
        outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, output in zip(processes, outputs):
        assert p.returncode == 0, output[-3000:]
    workers = [np.load(tmp_path / f"w{index}.npz") for index in range(2)]
    assert np.all(np.isfinite(workers[0]["loss"]))
    for key in workers[0].files:
        np.testing.assert_array_equal(workers[0][key], workers[1][key], err_msg=key)
