"""Can a run's attributions be trusted? One verdict with its reasons, from what the run measured.

Evidence, in the order it is weighed (README, "Can the attributions be trusted?"):

1. **Generalisation** (the build's ``health``): how far the checkpoints' validation retrieval is
   from chance, as ``lift = 1 - (median rank - 1) / (chance median rank - 1)`` (mean of
   image->text and text->image; 1 = every pair ranks its own match first, 0 = chance). TRAK
   explains the model's matching: a model at chance on validation pairs has nothing to explain
   there, and what its scores show is memorisation.
2. **Counterfactual check** (``trakview eval lds``, when run): is TRAK's LDS interval above the
   random baseline's, and above every CLIP-similarity baseline's?
3. **Conditioning** of X^T X (the build): a badly conditioned inverse makes scores noisy.

=============  ==========================================================================
verdict        when
=============  ==========================================================================
no signal      validation lift < ``NO_SIGNAL_LIFT``, or TRAK's LDS interval overlaps random's
weak           validation lift < ``RELIABLE_LIFT``, TRAK's LDS interval not above a CLIP
               baseline's, or a checkpoint's X^T X condition number above ``MAX_CONDITION``
reliable       otherwise
=============  ==========================================================================
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from engine import files
from engine.attribution.settings import MAX_CONDITION, estimator_label
from engine.run.health import health
from engine.run.layout import RunLayout
from engine.run.manifest import Manifest

NO_SIGNAL_LIFT = 0.5
RELIABLE_LIFT = 0.75  # the median validation pair ranks its match in the best eighth
LEVELS = ("reliable", "weak", "no signal")
CLIP_METHODS = ("clip-image", "clip-text", "clip-pair")


@dataclass
class Verdict:
    """How far a run's attributions can be trusted, and why."""

    level: str  # one of LEVELS
    reason: str  # the main reason, one sentence
    evidence: list[str] = field(default_factory=list)  # every measurement weighed, one line each

    @property
    def reliable(self) -> bool:
        return self.level == "reliable"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def lift(retrieval: dict[str, Any]) -> float:
    """How far a split's retrieval is from chance: 1 = perfect, 0 = chance (see module doc)."""
    chance = retrieval["chance"]["median_rank"]
    medians = [retrieval[d]["median_rank"] for d in ("image_to_text", "text_to_image")]
    if chance <= 1:
        return 0.0
    return 1 - (sum(medians) / len(medians) - 1) / (chance - 1)


def lds_trust(methods: dict[str, Any]) -> dict[str, bool | None]:
    """Whether TRAK's LDS interval lies above random's and above every CLIP baseline's (None:
    that baseline was not evaluated)."""
    trak = methods.get("trak")
    if trak is None:
        return {"above_random": None, "above_clip": None}
    low = trak["ci"][0]
    clips = [methods[m]["ci"][1] for m in CLIP_METHODS if m in methods]
    return {
        "above_random": low > methods["random"]["ci"][1] if "random" in methods else None,
        "above_clip": low > max(clips) if clips else None,
    }


def _describe(split: str, retrieval: dict[str, Any]) -> str:
    i2t, t2i = retrieval["image_to_text"], retrieval["text_to_image"]
    sample = "" if retrieval["n"] == retrieval.get("of", retrieval["n"]) else " (a sample)"
    return (
        f"{split}: {retrieval['n']} pairs{sample}, median rank {i2t['median_rank']:.1f} / "
        f"{t2i['median_rank']:.1f} (image->text / text->image; chance "
        f"{retrieval['chance']['median_rank']:g}), R@1 {i2t['r@1']:.2f} / {t2i['r@1']:.2f} "
        f"(chance {retrieval['chance']['r@1']:.3f}), lift {lift(retrieval):.2f}"
    )


def verdict(manifest: Manifest, lds: dict[str, Any] | None = None) -> Verdict:
    """The run's verdict from its manifest's health and conditioning and, when given, the
    content of ``eval/lds.json``."""
    retrieval = manifest.health.get("retrieval")
    if not retrieval:
        return Verdict(
            "weak",
            "this run was built before trakview measured retrieval: rebuild it to get a verdict",
        )
    evidence = [_describe(split, retrieval[split]) for split in ("val", "train")]
    val_lift = lift(retrieval["val"])
    no_signal, weak = [], []
    if val_lift < NO_SIGNAL_LIFT and lift(retrieval["train"]) < NO_SIGNAL_LIFT:
        no_signal.append(
            "retrieval is near chance on both splits: the model has not learned to match images "
            "and captions, so these attributions are noise"
        )
    elif val_lift < NO_SIGNAL_LIFT:
        no_signal.append(
            "validation retrieval is near chance: the model does not generalise, so these "
            "attributions explain memorisation, not matching"
        )
    elif val_lift < RELIABLE_LIFT:
        weak.append(
            "the model matches validation pairs only loosely (retrieval well below "
            "the training set's)"
        )
    if lds is not None:
        trak = lds["methods"].get("trak")
        trust = lds.get("trust") or lds_trust(lds["methods"])
        if trak is not None:
            evidence.append(
                f"LDS of this run's scores ({estimator_label(manifest.config)}) "
                f"{trak['lds']:+.3f} [{trak['ci'][0]:+.3f}, {trak['ci'][1]:+.3f}] "
                f"over {lds['counts']['subsets']} retrained subsets"
            )
        if trust["above_random"] is False:
            no_signal.append("TRAK's LDS is no better than random on retrained models")
        if trust["above_clip"] is False:
            weak.append("TRAK's LDS is not above plain CLIP similarity's on retrained models")
    else:
        evidence.append("not checked against retrained models yet (trakview eval lds)")
    bad = [c for c in manifest.conditioning if c.get("condition", 0) > MAX_CONDITION]
    if bad:
        weak.append(
            f"X^T X is badly conditioned for {len(bad)} of {len(manifest.conditioning)} "
            "checkpoints (scores may be noise: lower --proj-dim or raise --lambda-reg)"
        )
    if no_signal:
        return Verdict("no signal", no_signal[0], evidence)
    if weak:
        return Verdict("weak", weak[0], evidence)
    return Verdict(
        "reliable", "the model generalises and nothing measured argues against its scores", evidence
    )


def run_verdict(run: str | os.PathLike, manifest: Manifest) -> Verdict:
    """The verdict of a run directory, with its LDS evaluation when there is one (a run built
    before the manifest held its health gets it measured from its stored embeddings)."""
    layout = RunLayout(run)
    if (
        not manifest.health.get("retrieval")
        and layout.checkpoint_embeddings("val", "image", 0).is_file()
    ):
        manifest = replace(
            manifest, health={"retrieval": health(layout, manifest.n_models, manifest.config.seed)}
        )
    path = layout.lds_result
    return verdict(manifest, files.read_json(path) if path.is_file() else None)
