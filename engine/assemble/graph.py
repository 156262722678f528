"""The build as a graph of independent units, run by an executor (``engine.assemble.executors``).

Each unit computes one piece of a run from files that its dependencies wrote, writes its own
files atomically, then its done-marker ``RUN/units/ID.json`` (seconds, host, pid). A unit whose
marker exists is not run again: an executor may run the units in any order that respects
``deps``, retry one that died and resume the graph after a restart. The run directory is the only
state, so it may live on storage that every worker sees.

Per checkpoint m, over training shards s and validation shards v of ``shard_size`` rows:

==================  ===========================================================================
embed-m-SPLIT-s     the checkpoint's image and caption embeddings of one data shard
gather-embed-m      ``embeddings/{split}_{image,text}_m.npy``; stage ``embed-m``
featurize-m-s       X_s (projected gradients of the CLIP margin), out-to-loss, X_s^T X_s
xtx-m               the reduce: X^T X = sum_s X_s^T X_s (in shard order), lambda, conditioning
features-m-s        X_s (X^T X + lambda I)^-1
gather-trak-m       ``trak/m/{grads,out_to_loss,features}.mmap``; stages featurize-m, finalize-m
targets-m-v         projected gradients of the validation shard (the targets)
gather-targets-m    ``trak/m/val_grads.mmap``; stage score-m
==================  ===========================================================================

then, over all checkpoints, ``scores-v`` (the TRAK scores of every training pair for the
validation pairs of block v, and their top-k influencers; a block is a validation shard, or fewer
pairs when n_train is so large that its scores would pass 1 GiB) and ``gather-scores``
(``scores.npy``, ``topk_*.npy``).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ConfigError

# Elements of one scores unit's (n_train, columns) block: 1 GiB of float32 (traker's
# finalize_scores holds two such arrays).
SCORES_BLOCK_ELEMENTS = 2**28
# Units that compute on the build's device (a GPU per task on a cluster); gathers only copy.
DEVICE_KINDS = ("embed", "featurize", "xtx", "features", "targets", "scores")


@dataclass(frozen=True)
class Unit:
    """One unit of work: its kind, what it works on, and the units it needs first."""

    id: str
    kind: str
    deps: tuple[str, ...] = ()
    model_id: int = -1  # the checkpoint (-1: all of them)
    split: str = ""  # "train" or "val" for a unit that works on one shard
    shard: int = -1
    rows: tuple[int, int] = (0, 0)  # [start, stop) rows of the split

    @property
    def uses_device(self) -> bool:
        return self.kind in DEVICE_KINDS


def shard_rows(n: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, stop) of each shard of ``n`` rows."""
    if shard_size < 1:
        raise ConfigError(f"the shard size must be at least 1 row, got {shard_size}")
    return [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


def score_shard_size(n_train: int, shard_size: int) -> int:
    """Validation pairs per scores unit: ``shard_size``, fewer when the block of scores of every
    training pair would pass ``SCORES_BLOCK_ELEMENTS``."""
    return max(1, min(shard_size, SCORES_BLOCK_ELEMENTS // n_train))


def unit_id(kind: str, model_id: int | None = None, shard: int | None = None) -> str:
    """``kind-m-sssss``, without the parts that are None."""
    parts = [kind]
    if model_id is not None:
        parts.append(str(model_id))
    if shard is not None:
        parts.append(f"{shard:05d}")
    return "-".join(parts)


def plan(n_train: int, n_val: int, n_models: int, shard_size: int) -> list[Unit]:
    """Every unit of a build, in an order that runs each unit after its dependencies (the local
    executor's order: one checkpoint after another, then the scores)."""
    train, val = shard_rows(n_train, shard_size), shard_rows(n_val, shard_size)
    units: list[Unit] = []
    checkpoint_done: list[str] = []
    for m in range(n_models):
        embeds = [
            Unit(f"embed-{m}-{split}-{s:05d}", "embed", (), m, split, s, rows)
            for split, parts in (("train", train), ("val", val))
            for s, rows in enumerate(parts)
        ]
        gather_embed = Unit(unit_id("gather-embed", m), "gather-embed", _ids(embeds), m)
        featurize = [
            Unit(unit_id("featurize", m, s), "featurize", (gather_embed.id,), m, "train", s, rows)
            for s, rows in enumerate(train)
        ]
        xtx = Unit(unit_id("xtx", m), "xtx", _ids(featurize), m)
        features = [
            Unit(unit_id("features", m, s), "features", (xtx.id,), m, "train", s, rows)
            for s, rows in enumerate(train)
        ]
        gather_trak = Unit(unit_id("gather-trak", m), "gather-trak", _ids(features), m)
        targets = [
            Unit(unit_id("targets", m, v), "targets", (gather_embed.id,), m, "val", v, rows)
            for v, rows in enumerate(val)
        ]
        gather_targets = Unit(unit_id("gather-targets", m), "gather-targets", _ids(targets), m)
        units += [*embeds, gather_embed, *featurize, xtx, *features, gather_trak]
        units += [*targets, gather_targets]
        checkpoint_done += [gather_trak.id, gather_targets.id]
    scores = [
        Unit(unit_id("scores", shard=v), "scores", tuple(checkpoint_done), -1, "val", v, rows)
        for v, rows in enumerate(shard_rows(n_val, score_shard_size(n_train, shard_size)))
    ]
    return [*units, *scores, Unit("gather-scores", "gather-scores", _ids(scores))]


def _ids(units: list[Unit]) -> tuple[str, ...]:
    return tuple(u.id for u in units)
