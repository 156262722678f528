"""The build on a local Ray cluster (2 CPUs, one per task) gives the local executor's scores,
also when a worker process is killed in the middle of featurization (Ray reruns the unit it was
running). The reference build ran on one CPU thread too: float sums depend on the thread count."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from engine.assemble.executors import RayExecutor
from engine.assemble.orchestrate import build
from engine.files import read_json
from engine.run.layout import RunLayout

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster():
    with pytest.MonkeyPatch.context() as mp:
        # Ray lowers its workers' priority by default: on a busy machine they would wait for it
        mp.setenv("RAY_worker_niceness", "0")
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        yield
        ray.shutdown()


def _same_run(run: Path, reference: Path, n_models: int = 2) -> None:
    for name in ("scores.npy", "topk_pos.npy", "topk_neg.npy", "train_self_influence.npy"):
        assert np.array_equal(np.load(run / name), np.load(reference / name)), name
    for m in range(n_models):
        for kind in ("trak_features", "trak_target_grads"):
            path, ref = getattr(RunLayout(run), kind)(m), getattr(RunLayout(reference), kind)(m)
            assert np.array_equal(np.load(path), np.load(ref))


def test_ray_executor_gives_the_local_scores(
    ray_cluster, tmp_path, pairs, sharded_config, sharded_run
):
    cfg = sharded_config
    run = build(*pairs, cfg, tmp_path / "ray", executor=RayExecutor())
    _same_run(run, sharded_run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["executor"]["name"] == "ray" and manifest["executor"]["cluster"]["CPU"] == 2
    pids = {u["pid"] for u in manifest["units"]}
    assert os.getpid() not in pids and len(pids) >= 2  # the units ran in Ray's worker processes
    assert len(manifest["units"]) == len(list((run / "units").glob("*.json")))


class _KillOnce(RayExecutor):
    """Kills the worker process running ``featurize-1-00001`` the first time (SIGKILL: no
    cleanup, as when a node is lost); a file in the run directory remembers it."""

    def task(self):
        body = super().task()

        def dying(out, cfg, unit, *args):
            flag = Path(out) / "killed.json"
            if unit.id == "featurize-1-00001" and not flag.exists():
                flag.write_text(json.dumps({"pid": os.getpid()}))
                os.kill(os.getpid(), signal.SIGKILL)
            return body(out, cfg, unit, *args)

        return dying


def test_a_worker_killed_during_featurize_ends_in_the_same_scores(
    ray_cluster, tmp_path, pairs, sharded_config, sharded_run
):
    cfg = sharded_config
    run = build(*pairs, cfg, tmp_path / "killed", executor=_KillOnce(max_retries=2))
    killed = json.loads((run / "killed.json").read_text())["pid"]
    retried = read_json(RunLayout(run).unit("featurize-1-00001"))
    assert retried["pid"] != killed  # the unit finished in another process
    _same_run(run, sharded_run)
