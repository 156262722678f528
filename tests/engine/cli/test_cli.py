"""The command line as a user meets it: help texts, one-line errors, train/build/info/query."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from engine.cli import app, eval_cmds
from engine.evaluate import retrain
from engine.run.manifest import open_manifest


def trakview(*args: str) -> subprocess.CompletedProcess:
    """Runs the real console entry point (``main()``), as the ``trakview`` script does."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("command", ["demo", "train", "build", "query", "info"])
def test_every_command_documents_its_flags_with_defaults(command):
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "Usage:" in result.output
    if command in ("demo", "build", "train"):
        assert "[default:" in result.output


def test_build_help_lists_every_choice_of_the_tables_the_code_reads():
    from engine.attribution.settings import (
        ESTIMATORS,
        NORMALIZATIONS,
        OUTPUTS,
        PROJECTORS,
        SCORE_FORMS,
    )

    result = CliRunner().invoke(app, ["build", "--help"], env={"COLUMNS": "200"})
    said = " ".join(result.output.replace("│", " ").split())
    for flag, table in (
        ("--projector", PROJECTORS),
        ("--estimator", ESTIMATORS),
        ("--output", OUTPUTS),
        ("--normalize", NORMALIZATIONS),
        ("--scores", SCORE_FORMS),
    ):
        assert flag in said
        for choice in table:
            assert f"{choice} (" in said or f"{choice}:" in said, (flag, choice)


def test_errors_are_one_line(tmp_path):
    result = trakview("info", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: run directory {tmp_path / 'nope'} does not exist; build one with `trakview build`"
    ]
    result = trakview(
        "build",
        "--train-data",
        str(tmp_path / "t.jsonl"),
        "--val-data",
        str(tmp_path / "v.jsonl"),
        "--checkpoint",
        "x.pt",
        "--out",
        str(tmp_path),
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: jsonl source" in result.stderr and "does not exist" in result.stderr
    result = trakview(
        "train", "--train-data", "x.jsonl", "--out", str(tmp_path), "--save-epochs", "5,20"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    said = " ".join(result.stderr.replace("│", " ").split())  # typer boxes and wraps it
    assert "--save-epochs" in said and "[20] outside 1..15" in said
    result = trakview(
        "build", "--train-data", "t.jsonl", "--val-data", "v.jsonl", "--checkpoint", "x.pt",
        "--out", str(tmp_path / "r"), "--executor", "ray", "--jobs", "2",
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: --jobs applies to --executor local only" in result.stderr
    result = trakview("train", "--train-data", "x.jsonl", "--out", str(tmp_path), "--jobs", "-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    said = " ".join(result.stderr.replace("│", " ").split())
    assert "--jobs" in said and "must be 0 (auto) or a number of processes, got -1" in said
    result = trakview("demo", "--out", str(tmp_path), "--epochs", "2", "--snapshots", "3")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    said = " ".join(result.stderr.replace("│", " ").split())
    assert "--snapshots" in said and "between 1 and the epochs (2), got 3" in said
    assert not (tmp_path / "data").exists()
    result = trakview("demo", "--out", str(tmp_path), "--base-epochs", "-1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    said = " ".join(result.stderr.replace("│", " ").split())
    assert "--base-epochs" in said and "must be 0 or more, got -1" in said
    assert not (tmp_path / "base").exists()


def test_train_build_info_query_round_trip(tmp_path, world_dir, run_dir):
    out = tmp_path / "ens"
    result = trakview(
        "train",
        "--train-data",
        str(world_dir / "train.jsonl"),
        "--out",
        str(out),
        "--members",
        "1",
        "--epochs",
        "2",
        "--save-epochs",
        "1",
        "--batch-size",
        "120",
    )
    assert result.returncode == 0, result.stderr
    folder = out / "member-0" / "checkpoints"
    assert result.stdout.split() == [str(folder / "epoch_1.pt"), str(folder / "epoch_2.pt")]
    ckpt = folder / "epoch_2.pt"

    run = tmp_path / "run"
    result = trakview(
        "build",
        "--train-data",
        str(world_dir / "train.jsonl"),
        "--val-data",
        str(world_dir / "val.jsonl"),
        "--checkpoint",
        str(ckpt),
        "--out",
        str(run),
        "--proj-dim",
        "32",
        "--topk",
        "5",
    )
    assert result.returncode == 0, result.stderr
    assert (run / "manifest.json").is_file()

    info = trakview("info", str(run))
    assert "trakview-tiny x 1 checkpoints" in info.stdout and "proj_dim 32" in info.stdout

    val = json.loads((run_dir / "val.jsonl").read_text().splitlines()[2])
    result = trakview(
        "query",
        str(run_dir),
        "--image",
        str(run_dir / val["image"]),
        "--caption",
        val["caption"],
        "-k",
        "3",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert len(payload["positive"]) == len(payload["negative"]) == 3
    assert payload["caption"] == val["caption"]


def test_small_demo_attributes_every_snapshot(tmp_path):
    """`trakview demo` end to end on a small world: each model's snapshots are in the run."""
    out = tmp_path / "demo"
    result = trakview(
        "demo", "--out", str(out), "--no-serve", "--n-train", "300", "--n-val", "30",
        "--members", "2", "--epochs", "2", "--snapshots", "2", "--base-epochs", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "run" / "manifest.json").read_text())
    names = [c["path"].split("models/")[-1] for c in manifest["checkpoints"]]
    assert names == [
        "member-0/checkpoints/epoch_1.pt",
        "member-0/checkpoints/epoch_2.pt",
        "member-1/checkpoints/epoch_1.pt",
        "member-1/checkpoints/epoch_2.pt",
    ]
    train_cfg = json.loads((out / "models" / "train_config.json").read_text())
    assert train_cfg["save_epochs"] == [1] and train_cfg["epochs"] == 2
    # fine-tuned from the base model, trained first on a second world (seed 1)
    base = (out / "base" / "model" / "member-0" / "checkpoints" / "epoch_1.pt").resolve()
    assert base.is_file()  # recorded relative to models/, so that the demo folder can move
    assert train_cfg["init"] == "../base/model/member-0/checkpoints/epoch_1.pt"
    assert (train_cfg["lr"], train_cfg["warmup_steps"]) == (1e-3, 10)
    base_cfg = json.loads((out / "base" / "model" / "train_config.json").read_text())
    assert (base_cfg["seed"], base_cfg["members"], base_cfg["init"]) == (1, 1, None)
    base_world = (out / "base" / "data" / "train.jsonl").read_text()
    assert base_world != (out / "data" / "train.jsonl").read_text()
    # `trakview eval` retrains with the recorded trainer: from the same base model
    manifest = open_manifest(out / "run")
    recorded, source = retrain.run_train_config(out / "run", manifest)
    assert recorded["init"] == str(base)
    assert source == str(out / "models" / "train_config.json")  # not RUN/../models/...
    moved = out.rename(tmp_path / "moved-demo")  # the whole demo moved: found at its new place
    tcfg, _ = eval_cmds.train_config(moved / "run", {})
    assert tcfg.init == str(
        moved.resolve() / "base" / "model" / "member-0" / "checkpoints" / "epoch_1.pt"
    )
    out = moved.rename(out)
    (out / "base").rename(out / "moved")  # a user moved the base model only: one clear line
    result = trakview("eval", "lds", str(out / "run"), "--subsets", "2")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    said = " ".join(result.stderr.replace("│", " ").split())
    assert f"were fine-tuned from {base}" in said and "which is not there" in said
    # the demo again, finished: its models are there, so the base model is not trained again
    again = trakview(
        "demo", "--out", str(out), "--no-serve", "--n-train", "300", "--n-val", "30",
        "--members", "2", "--epochs", "2", "--snapshots", "2", "--base-epochs", "1",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert not (out / "base").exists()
