"""Every path of a run directory, in one place (README, "The run directory").

A run is a folder that the build writes, the dashboard reads and a notebook can read with numpy
alone. ``RunLayout(root)`` names each of its files; no other module of trakview writes a run
file name as a literal (a test checks it). Writes go through ``engine.files`` (atomic).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engine import files

FORMAT_VERSION = 2
# Versions this trakview opens: 1 lacks the per-pair summaries of the scores (they are
# computed from scores.npy when a run of version 1 is read) and the top-k form.
READABLE_VERSIONS = (1, 2)
SPLITS = ("train", "val")
MODALITIES = ("image", "text")
TARGETS = "val"  # traker's experiment name of the validation targets (trak/m/val_grads.mmap)

# Fixed file names, for the test that no other module spells them.
MANIFEST = "manifest.json"
CONFIG = "config.json"
RUN_TOML = "run.toml"
SKIPPED = "skipped.jsonl"
SCORES = "scores.npy"
TOPK_POS = "topk_pos.npy"
TOPK_NEG = "topk_neg.npy"
TOPK_POS_SCORES = "topk_pos_scores.npy"
TOPK_NEG_SCORES = "topk_neg_scores.npy"
SCORE_HIST = "val_score_hist.npy"
SCORE_RANGE = "val_score_range.npy"
SIMILAR = "val_similar.npy"
SIMILAR_SCORES = "val_similar_scores.npy"
TRAIN_SCORE_SUM = "train_score_sum.npy"
TRAIN_NEGATIVE_MASS = "train_negative_mass.npy"
SELF_INFLUENCE = "train_self_influence.npy"
SUSPECT = "suspect_mislabeled.npy"
INDEX_META = "index.json"
TRAK_METADATA = "metadata.json"
TRAK_GRADS = "grads.mmap"
TRAK_FEATURES = "features.mmap"
TRAK_OUT_TO_LOSS = "out_to_loss.mmap"
TRAK_XTX = "xtx.npy"
TRAK_IS_FEATURIZED = "_is_featurized.mmap"
LDS_RESULT = "lds.json"
REMOVAL_RESULT = "remove.json"
EVAL_SUBSETS = "subsets.npy"
EVAL_OUTPUTS = "outputs.npy"
LOCK = ".lock"
FILE_NAMES = (
    MANIFEST,
    CONFIG,
    RUN_TOML,
    SKIPPED,
    SCORES,
    TOPK_POS,
    TOPK_NEG,
    TOPK_POS_SCORES,
    TOPK_NEG_SCORES,
    SCORE_HIST,
    SCORE_RANGE,
    SIMILAR,
    SIMILAR_SCORES,
    TRAIN_SCORE_SUM,
    TRAIN_NEGATIVE_MASS,
    SELF_INFLUENCE,
    SUSPECT,
    INDEX_META,
    TRAK_METADATA,
    TRAK_GRADS,
    TRAK_FEATURES,
    TRAK_OUT_TO_LOSS,
    TRAK_XTX,
    TRAK_IS_FEATURIZED,
    LDS_RESULT,
    REMOVAL_RESULT,
    EVAL_SUBSETS,
    EVAL_OUTPUTS,
    LOCK,
    *(f"{s}.jsonl" for s in SPLITS),
    *(f"{s}_{m}_emb.npy" for s in SPLITS for m in MODALITIES),
    *(f"{s}_{kind}.npy" for s in SPLITS for kind in ("clip_sim", "margin", "caption_rank")),
)


class RunLayout:
    """The paths of one run directory; ``root`` need not exist yet."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    # --- what the build starts and ends with ---------------------------------------------------

    @property
    def manifest(self) -> Path:
        """Written last and atomically: a folder without it is an unfinished build."""
        return self.root / MANIFEST

    @property
    def config(self) -> Path:
        """The settings and data fingerprints the build started with (refuses another resume)."""
        return self.root / CONFIG

    @property
    def run_toml(self) -> Path:
        """The flags the run was built with (``trakview build --config RUN/run.toml``)."""
        return self.root / RUN_TOML

    @property
    def skipped(self) -> Path:
        """Pairs the build could not use (broken image, empty caption), one JSON line each."""
        return self.root / SKIPPED

    def pairs(self, split: str) -> Path:
        """``train.jsonl`` / ``val.jsonl``: the usable pairs, in the order of every array."""
        return self.root / f"{split}.jsonl"

    @property
    def lock(self) -> Path:
        """Held (``flock``) by the build or evaluation writing the run (``engine.run.lock``)."""
        return self.root / LOCK

    # --- arrays ---------------------------------------------------------------------------------

    def embeddings(self, split: str, modality: str) -> Path:
        """Ensemble embeddings: (n, M*d) float32, each checkpoint's unit embedding / sqrt(M)."""
        return self.root / f"{split}_{modality}_emb.npy"

    def checkpoint_embeddings(self, split: str, modality: str, model_id: int) -> Path:
        """Checkpoint ``model_id``'s unit embeddings: (n, d) float32."""
        return self.root / "embeddings" / f"{split}_{modality}_{model_id}.npy"

    def clip_sim(self, split: str) -> Path:
        """(n,) float32 mean cosine of each pair's image and caption."""
        return self.root / f"{split}_clip_sim.npy"

    def margin(self, split: str) -> Path:
        """(n,) float32 CLIP margin (the attributed model output), mean over checkpoints."""
        return self.root / f"{split}_margin.npy"

    def caption_rank(self, split: str) -> Path:
        """(n,) int32 rank (1 = best) of each pair's caption among its split's captions."""
        return self.root / f"{split}_caption_rank.npy"

    @property
    def scores(self) -> Path:
        """(n_train, n_val) float32 TRAK scores; positive = helps the pair match."""
        return self.root / SCORES

    @property
    def topk_pos(self) -> Path:
        """(n_val, K) int32 rows of the K most positive training pairs, strongest first."""
        return self.root / TOPK_POS

    @property
    def topk_neg(self) -> Path:
        """(n_val, K) int32 rows of the K most negative training pairs, strongest first."""
        return self.root / TOPK_NEG

    @property
    def topk_pos_scores(self) -> Path:
        """(n_val, K) float32 scores of ``topk_pos``'s rows."""
        return self.root / TOPK_POS_SCORES

    @property
    def topk_neg_scores(self) -> Path:
        """(n_val, K) float32 scores of ``topk_neg``'s rows."""
        return self.root / TOPK_NEG_SCORES

    @property
    def score_hist(self) -> Path:
        """(n_val, B) int64 counts of each validation pair's scores in B equal bins."""
        return self.root / SCORE_HIST

    @property
    def score_range(self) -> Path:
        """(n_val, 2) float32 lowest and highest score of each validation pair (the bins' ends)."""
        return self.root / SCORE_RANGE

    @property
    def similar(self) -> Path:
        """(n_val, K) int32 training rows most similar to each validation image (CLIP)."""
        return self.root / SIMILAR

    @property
    def similar_scores(self) -> Path:
        """(n_val, K) float32 their mean cosine similarities."""
        return self.root / SIMILAR_SCORES

    @property
    def train_score_sum(self) -> Path:
        """(n_train,) float32 each training pair's scores summed over the validation pairs."""
        return self.root / TRAIN_SCORE_SUM

    @property
    def train_negative_mass(self) -> Path:
        """(n_train,) float32 the sum of its negative scores (how much it hurts, in all)."""
        return self.root / TRAIN_NEGATIVE_MASS

    @property
    def self_influence(self) -> Path:
        """(n_train,) float32 TRAK self-influence of each training pair."""
        return self.root / SELF_INFLUENCE

    @property
    def suspect(self) -> Path:
        """(n_train,) float32 suspected-mislabeled ranking, higher = more suspect."""
        return self.root / SUSPECT

    # --- search indexes -------------------------------------------------------------------------

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    def index(self, name: str) -> Path:
        """A faiss index of the run (``trak``, ``train_image``, ``val_text``, ...)."""
        return self.index_dir / f"{name}.faiss"

    @property
    def index_meta(self) -> Path:
        """What each index of the run is: kind, parameters, sizes, recall, sources."""
        return self.index_dir / INDEX_META

    # --- traker's store -------------------------------------------------------------------------

    @property
    def trak_dir(self) -> Path:
        """traker's save_dir: ``TRAKer(save_dir=RUN/trak, ...)`` opens it."""
        return self.root / "trak"

    @property
    def trak_metadata(self) -> Path:
        return self.trak_dir / TRAK_METADATA

    def trak_model_ids(self, model_id: int) -> Path:
        """traker's record that checkpoint ``model_id`` is featurized and finalized."""
        return self.trak_dir / f"id_{model_id}.json"

    def trak_is_featurized(self, model_id: int) -> Path:
        return self.trak_dir / str(model_id) / TRAK_IS_FEATURIZED

    def trak_grads(self, model_id: int) -> Path:
        """Projected training gradients X_m: (n_train, proj_dim) npy."""
        return self.trak_dir / str(model_id) / TRAK_GRADS

    def trak_features(self, model_id: int) -> Path:
        """Finalized features X_m (X_m^T X_m + lambda I)^-1: (n_train, proj_dim) npy."""
        return self.trak_dir / str(model_id) / TRAK_FEATURES

    def trak_out_to_loss(self, model_id: int) -> Path:
        """Out-to-loss weights: (n_train, 1) npy."""
        return self.trak_dir / str(model_id) / TRAK_OUT_TO_LOSS

    def trak_target_grads(self, model_id: int, experiment: str = TARGETS) -> Path:
        """Projected target gradients: (n_targets, proj_dim) npy."""
        return self.trak_dir / str(model_id) / f"{experiment}_grads.mmap"

    def trak_xtx(self, model_id: int) -> Path:
        """X_m^T X_m: (proj_dim, proj_dim) float64 npy."""
        return self.trak_dir / str(model_id) / TRAK_XTX

    # --- build progress -------------------------------------------------------------------------

    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"

    def stage(self, stage: str) -> Path:
        """One marker per finished stage, with its timing."""
        return self.stages_dir / f"{stage}.json"

    def stage_done(self, stage: str) -> bool:
        return self.stage(stage).is_file()

    def mark_stage(self, stage: str, info: dict[str, Any]) -> None:
        files.write_json(self.stage(stage), info)

    def read_stage(self, stage: str) -> dict[str, Any]:
        return files.read_json(self.stage(stage))

    def stages(self) -> list[str]:
        """The finished stages, sorted by name."""
        return sorted(p.stem for p in self.stages_dir.glob("*.json"))

    @property
    def units_dir(self) -> Path:
        return self.root / "units"

    def unit(self, unit_id: str) -> Path:
        """Done-marker of one unit of the build graph: its timing and where it ran."""
        return self.units_dir / f"{unit_id}.json"

    def unit_done(self, unit_id: str) -> bool:
        return self.unit(unit_id).is_file()

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def shard_dir(self, group: str) -> Path:
        """Shard files of one gather (``embed-M``, ``train-M``, ``val-M``, ``scores``); the
        gather that assembles them removes the folder."""
        return self.shards_dir / group

    def shard(self, group: str, name: str, shard: int) -> Path:
        return self.shard_dir(group) / f"{name}_{shard:05d}.npy"

    # --- what readers add -----------------------------------------------------------------------

    @property
    def image_cache(self) -> Path:
        """May be deleted: images extracted from WebDataset shards for the dashboard, exports."""
        return self.root / "cache" / "images"

    @property
    def baskets_dir(self) -> Path:
        """Named baskets of training pairs (``engine.curate``): the only thing the dashboard
        writes, on an explicit save."""
        return self.root / "baskets"

    def basket(self, name: str) -> Path:
        """One basket: ``baskets/NAME.json`` (``name`` already checked to be a safe file stem)."""
        return self.baskets_dir / f"{name}.json"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def lds_result(self) -> Path:
        """Results of ``trakview eval lds``."""
        return self.eval_dir / LDS_RESULT

    @property
    def removal_result(self) -> Path:
        """Results of ``trakview eval remove``."""
        return self.eval_dir / REMOVAL_RESULT

    def eval_cache(self, kind: str) -> EvalCache:
        """The retrained models of one evaluation (``lds``, ``remove``)."""
        return EvalCache(self.eval_dir / kind)


class EvalCache:
    """``RUN/eval/KIND/``: the retrained models of one evaluation and what was measured."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def config(self) -> Path:
        """The settings the cached models were made with."""
        return self.folder / CONFIG

    @property
    def subsets(self) -> Path:
        """LDS: (N, n_train) bool, the training subsets."""
        return self.folder / EVAL_SUBSETS

    @property
    def outputs(self) -> Path:
        """LDS: (N, n_val) float32, each subset's mean model output."""
        return self.folder / EVAL_OUTPUTS

    @property
    def outputs_dir(self) -> Path:
        return self.folder / "outputs"

    def output(self, key: str) -> Path:
        """(n_val,) model output of one retrained model; its presence means "done"."""
        return self.outputs_dir / f"{key}.npy"

    def output_info(self, key: str) -> Path:
        """Seed, rows and seconds of one retrained model."""
        return self.outputs_dir / f"{key}.json"

    @property
    def checkpoints_dir(self) -> Path:
        """Models while they train (a killed evaluation resumes mid-training), or kept ones."""
        return self.folder / "checkpoints"
