"""The build graph: its units and their order, a sharded build against the one-shard build, and
the choice of executor."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from engine.assemble import graph
from engine.assemble.executors import LocalExecutor, auto_jobs, make
from engine.assemble.graph import Unit, shard_rows
from engine.errors import ExecutorError
from engine.parallel import MAX_AUTO_JOBS
from engine.run.layout import RunLayout


def test_plan_runs_every_unit_after_its_dependencies(monkeypatch):
    monkeypatch.setattr(graph, "SCORES_BLOCK_ELEMENTS", 250 * 20)  # 20 targets per scores unit
    plan = graph.plan(n_train=250, n_val=45, n_models=2, shard_size=100)
    ids = [u.id for u in plan]
    assert len(ids) == len(set(ids))
    position = {u: i for i, u in enumerate(ids)}
    for u in plan:
        assert all(position[d] < position[u.id] for d in u.deps), u.id
    kinds = [u.kind for u in plan]
    assert kinds.count("embed") == 2 * (3 + 1)  # per checkpoint: 3 training + 1 validation shard
    assert kinds.count("featurize") == kinds.count("features") == 2 * 3
    assert kinds.count("xtx") == kinds.count("targets") == 2
    assert [u.rows for u in plan if u.kind == "featurize"][:3] == [(0, 100), (100, 200), (200, 250)]
    assert [u.rows for u in plan if u.kind == "scores"] == [(0, 20), (20, 40), (40, 45)]
    # the reduce needs every shard of its checkpoint, and the scores every checkpoint
    assert set(next(u for u in plan if u.id == "xtx-1").deps) == {
        f"featurize-1-{s:05d}" for s in range(3)
    }
    assert {"gather-trak-0", "gather-trak-1", "gather-targets-1"} <= set(plan[-2].deps)
    assert plan[-1].id == "gather-scores"
    with pytest.raises(ValueError, match="at least 1 row"):
        shard_rows(10, 0)


def test_sharded_build_agrees_with_the_one_shard_build(sharded_run, run_dir):
    """Shards change only the order of float sums (X^T X, embeddings in other batches)."""
    one, many = np.load(run_dir / "scores.npy"), np.load(sharded_run / "scores.npy")
    np.testing.assert_allclose(many, one, rtol=1e-3, atol=1e-4 * np.abs(one).max())
    np.testing.assert_array_equal(
        np.load(run_dir / "topk_pos.npy")[:, :5], np.load(sharded_run / "topk_pos.npy")[:, :5]
    )
    manifest = json.loads((sharded_run / "manifest.json").read_text())
    assert manifest["config"]["shard_size"] == 80 and manifest["executor"]["name"] == "local"
    done = {u["unit"] for u in manifest["units"]}
    assert {"featurize-1-00002", "xtx-1", "scores-00000", "gather-scores"} <= done
    assert not (sharded_run / "shards").exists()  # every gather removed its shard files
    # the gathered trak/ store is traker's: ids, metadata and featurized flags
    meta = json.loads((RunLayout(sharded_run).trak_dir / "metadata.json").read_text())
    assert meta == {"JL dimension": 64, "JL matrix type": "normal", "train set size": 240}
    xtx = np.load(RunLayout(sharded_run).trak_xtx(1))
    grads = np.load(RunLayout(sharded_run).trak_grads(1)).astype(np.float64)
    np.testing.assert_allclose(xtx, grads.T @ grads, rtol=1e-10, atol=1e-12 * np.abs(xtx).max())


def test_executor_choice_errors_say_how_to_fix_them(monkeypatch):
    assert isinstance(make("local"), LocalExecutor)
    with pytest.raises(ExecutorError, match="apply to --executor ray only"):
        make("local", address="auto")
    with pytest.raises(ExecutorError, match="one of local, ray"):
        make("dask")
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ExecutorError, match=r"pip install 'trakview\[ray\]'"):
        make("ray")
    with pytest.raises(ExecutorError, match="--jobs applies to --executor local"):
        make("ray", jobs=2)
    with pytest.raises(ExecutorError, match="--jobs must be 0"):
        make("local", jobs=-1)


def test_parallel_local_build_equals_the_one_process_build(tmp_path, world_dir, sharded_run):
    """Two worker processes of one thread give the one-thread build bit for bit, started from a
    user's script that has no ``if __name__ == "__main__"`` guard (spawn would run it again)."""
    cfg = json.loads((sharded_run / "manifest.json").read_text())["config"]
    script = tmp_path / "build_it.py"
    script.write_text(
        "import json, sys\n"
        "from engine.attribution.settings import BuildConfig\n"
        "from engine.assemble.executors import LocalExecutor\n"
        "from engine.assemble.orchestrate import build\n"
        "from engine.data.pairs import read_pairs\n"
        f"cfg = BuildConfig(**json.loads({json.dumps(json.dumps(cfg))}))\n"
        f"train = read_pairs({str(world_dir / 'train.jsonl')!r})\n"
        f"val = read_pairs({str(world_dir / 'val.jsonl')!r})\n"
        "executor = LocalExecutor(jobs=2, threads=1)\n"
        f"build(train, val, cfg, {str(tmp_path / 'run')!r}, executor=executor)\n"
        "print('built', executor.describe())\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("built") == 1  # the script ran once: the workers did not rerun it
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["executor"]["jobs"] == 2 and manifest["executor"]["threads_per_job"] == 1
    assert len({u["pid"] for u in manifest["units"]}) == 2  # the units ran in both workers
    for name in ("scores.npy", "topk_pos.npy", "topk_neg.npy", "train_image_emb.npy"):
        np.testing.assert_array_equal(np.load(run / name), np.load(sharded_run / name), name)


def test_parallel_local_build_stops_at_a_failing_unit(tmp_path, sharded_config):
    """A unit's error in a worker process is raised by the build; finished units keep their
    done-markers (so a resume skips them)."""
    plan = [Unit("broken-a", "no-such-kind"), Unit("broken-b", "no-such-kind")]
    with pytest.raises(KeyError, match="no-such-kind"):
        LocalExecutor(jobs=2, threads=1).run(plan, tmp_path, sharded_config)


def test_auto_jobs_keeps_small_and_gpu_builds_in_one_process(sharded_config):
    four = dataclasses.replace(sharded_config, checkpoints=sharded_config.checkpoints * 2)
    plan = graph.plan(n_train=3000, n_val=300, n_models=4, shard_size=20000)
    assert auto_jobs(plan, four, cpus=2) == 2
    assert auto_jobs(plan, four, cpus=16) == MAX_AUTO_JOBS == 4
    assert auto_jobs(plan, sharded_config, cpus=16) == 2  # one job per checkpoint
    small = graph.plan(n_train=240, n_val=40, n_models=2, shard_size=20000)
    assert auto_jobs(small, four, cpus=2) == 1
    assert auto_jobs(plan, dataclasses.replace(four, device="cuda"), cpus=2) == 1
