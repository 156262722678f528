"""The trust verdict: *no signal* for a run of untrained checkpoints, *reliable* for a model that
learnt the small world, and how an LDS evaluation and the conditioning move it."""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest

from engine.explore.trust import RELIABLE_LIFT, lds_trust, lift, run_verdict, verdict
from engine.models.retrieval import chance, retrieval_ranks, split_retrieval
from engine.run.manifest import open_manifest


def test_retrieval_ranks_against_a_brute_force_count():
    rng = np.random.default_rng(0)
    img, txt = rng.standard_normal((2, 30, 8))
    i2t, t2i = retrieval_ranks(img, txt, block=7)
    sim = img @ txt.T
    for i in range(30):
        others = np.delete(np.arange(30), i)
        assert i2t[i] == 1 + (sim[i, others] >= sim[i, i]).sum()
        assert t2i[i] == 1 + (sim[others, i] >= sim[i, i]).sum()
    perfect = split_retrieval([(np.eye(5), np.eye(5))])
    assert perfect["image_to_text"]["r@1"] == 1 and lift(perfect) == 1
    constant = split_retrieval([(np.ones((5, 2)), np.ones((5, 2)))])  # ties count against
    assert constant["image_to_text"]["median_rank"] == 5 and lift(constant) < 0
    assert chance(300)["median_rank"] == 150.5 and chance(300)["r@10"] == pytest.approx(1 / 30)


def test_untrained_checkpoints_give_no_signal(untrained_run):
    manifest = open_manifest(untrained_run)
    val = manifest.health["retrieval"]["val"]
    assert val["n"] == 40 and abs(lift(val)) < 0.5
    found = run_verdict(untrained_run, manifest)
    assert found.level == "no signal"
    assert "near chance on both splits" in found.reason
    info = subprocess.run(
        [sys.executable, "-m", "engine.cli", "info", str(untrained_run)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "trust        no signal: retrieval is near chance" in info.stdout


def test_a_model_that_learnt_the_world_is_reliable(run_dir):
    manifest = open_manifest(run_dir)
    found = run_verdict(run_dir, manifest)
    assert lift(manifest.health["retrieval"]["val"]) >= RELIABLE_LIFT, found.evidence
    assert found.level == "reliable", found
    assert any("trakview eval lds" in line for line in found.evidence)


def _lds(trak, random, clip):
    methods = {"trak": {"lds": sum(trak) / 2, "ci": trak}, "random": {"ci": random}}
    methods["clip-pair"] = {"ci": clip}
    return {"methods": methods, "counts": {"subsets": 64}}


def test_lds_and_conditioning_move_the_verdict(run_dir):
    manifest = open_manifest(run_dir)
    assert verdict(manifest, _lds([0.07, 0.12], [-0.03, 0.03], [-0.05, 0.05])).reliable
    noise = verdict(manifest, _lds([-0.006, 0.053], [-0.02, 0.03], [-0.05, 0.05]))
    assert noise.level == "no signal" and "no better than random" in noise.reason
    similar = verdict(manifest, _lds([0.04, 0.09], [-0.02, 0.03], [0.0, 0.06]))
    assert similar.level == "weak" and "CLIP similarity" in similar.reason
    assert lds_trust(_lds([0.04, 0.09], [-0.02, 0.03], [0.0, 0.06])["methods"]) == {
        "above_random": True,
        "above_clip": False,
    }
    bad = copy.deepcopy(manifest)
    bad.conditioning[0]["condition"] = 1e9
    assert verdict(bad).level == "weak" and "badly conditioned" in verdict(bad).reason
