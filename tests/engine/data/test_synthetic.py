"""Tests of the demo world: determinism, exact planted counts and the planted ground truth."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from engine.data import failures
from engine.data.failures import SOURCES, SWAPPED, WATERMARK_COLOUR, WATERMARK_SOURCE
from engine.data.synthetic import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    RARE_SHAPE,
    SHAPES,
    WorldConfig,
    generate_world,
)

CONFIG = WorldConfig(
    n_train=400, n_val=100, seed=7, near_duplicate_fraction=0.1, mislabeled_fraction=0.05
)
ALL_SHAPES = (*SHAPES, RARE_SHAPE)


@pytest.fixture(scope="module")
def world():
    return generate_world(CONFIG)


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption)


def describes(caption: str, record: dict) -> bool:
    """Whether a caption names exactly the record's colour and shape and agrees on the rest."""
    tokens = words(caption)
    colours = [t for t in tokens if t in COLOURS]
    shapes = [t for t in tokens if t in ALL_SHAPES]
    backgrounds = [t for t in tokens if t in BACKGROUNDS]
    sizes = {"small" if t == "small" else "large" for t in tokens if t in ("small", "large", "big")}
    position_words = [t for t in tokens if t in ("top", "bottom", "left", "right", "center")]
    return (
        colours == [record["colour"]]
        and shapes == [record["shape"]]
        and backgrounds in ([], [record["background"]])
        and sizes <= {record["size"]}
        and position_words == record["position"].split()
    )


def test_same_seed_gives_identical_world(world):
    again = generate_world(CONFIG)
    assert again.train == world.train
    assert again.val == world.val
    assert np.array_equal(again.train_images, world.train_images)
    assert np.array_equal(again.val_images, world.val_images)


def test_different_seed_gives_different_world(world):
    other = generate_world(replace(CONFIG, seed=8))
    assert [r["caption"] for r in other.train] != [r["caption"] for r in world.train]
    assert not np.array_equal(other.train_images, world.train_images)
    assert not np.array_equal(other.val_images, world.val_images)


def test_images_are_uint8_of_the_configured_size():
    small = generate_world(replace(CONFIG, n_train=60, n_val=20, image_size=32))
    assert small.train_images.dtype == np.uint8
    assert small.val_images.dtype == np.uint8
    assert small.train_images.shape == (60, 32, 32, 3)
    assert small.val_images.shape == (20, 32, 32, 3)


def test_images_show_the_object_colour(world):
    # Colour jitter is at most ~35 levels and pixel noise 5 levels; backgrounds and distractors
    # stay over 60 levels away from every object colour in at least one channel.
    records = world.train + world.val
    images = np.concatenate([world.train_images, world.val_images]).astype(np.int16)
    for record, image in zip(records, images, strict=True):
        target = np.array(COLOURS[record["colour"]], dtype=np.int16)
        n_close = int((np.abs(image - target).max(axis=-1) <= 60).sum())
        assert n_close >= 15, (record["id"], record["colour"], n_close)
        assert image.std() > 10, record["id"]


def test_planted_counts_are_exact(world):
    assert len(world.train) == CONFIG.n_train
    assert len(world.val) == CONFIG.n_val
    n_dup = sum(r["near_duplicate_of"] is not None for r in world.train)
    assert n_dup == round(CONFIG.near_duplicate_fraction * CONFIG.n_val) == 10
    assert sum(r["mislabeled"] for r in world.train) == round(CONFIG.mislabeled_fraction * 400)
    assert sum(r["rare"] for r in world.train) == CONFIG.n_rare_train
    assert sum(r["rare"] for r in world.val) == CONFIG.n_rare_val
    assert not any(r["mislabeled"] or r["near_duplicate_of"] for r in world.val)


def test_ids_are_unique_and_ordered(world):
    assert [r["id"] for r in world.train] == [f"t{i:05d}" for i in range(CONFIG.n_train)]
    assert [r["id"] for r in world.val] == [f"v{i:04d}" for i in range(CONFIG.n_val)]


def test_records_have_a_fixed_schema_and_known_values(world):
    keys = {"id", "caption", "shape", "colour", "size", "position", "background"}
    keys |= {"near_duplicate_of", "mislabeled", "true_caption", "rare", "source"}
    keys |= {"planted_failure"}
    for record in world.train + world.val:
        assert set(record) == keys
        assert record["shape"] in ALL_SHAPES
        assert record["colour"] in COLOURS
        assert record["size"] in ("small", "large")
        assert record["position"] in POSITIONS
        assert record["background"] in BACKGROUNDS
        assert record["source"] in SOURCES
        assert record["planted_failure"] is False


def test_special_training_pairs_are_spread_out(world):
    special = [
        i
        for i, r in enumerate(world.train)
        if r["mislabeled"] or r["rare"] or r["near_duplicate_of"] is not None
    ]
    n = len(special)
    assert special != list(range(CONFIG.n_train - n, CONFIG.n_train))
    assert special != list(range(n))
    assert special[0] < CONFIG.n_train // 2 < special[-1]


def test_captions_use_varied_templates(world):
    vocabulary = {*COLOURS, *ALL_SHAPES, *BACKGROUNDS, "small", "large", "big"}
    centred = [r["caption"] for r in world.train if r["position"] == "center"]
    patterns = {" ".join("X" if t in vocabulary else t for t in words(c)) for c in centred}
    assert len(patterns) >= 6
    mentions_background = [any(t in BACKGROUNDS for t in words(r["caption"])) for r in world.train]
    assert 0.1 < np.mean(mentions_background) < 0.9


def test_true_captions_describe_the_image_attributes(world):
    for record in world.train + world.val:
        assert describes(record["true_caption"], record), record
        if not record["mislabeled"]:
            assert record["caption"] == record["true_caption"]


def test_mislabeled_captions_change_exactly_one_colour_or_shape(world):
    mislabeled = [r for r in world.train if r["mislabeled"]]
    assert mislabeled
    for record in mislabeled:
        assert record["near_duplicate_of"] is None and not record["rare"]
        wrong, true = words(record["caption"]), words(record["true_caption"])
        assert len(wrong) == len(true)
        changed = [(w, t) for w, t in zip(wrong, true, strict=True) if w != t]
        assert len(changed) == 1, record
        ((w, t),) = changed
        assert (w in COLOURS and t in COLOURS) or (w in SHAPES and t in SHAPES), record
        assert not describes(record["caption"], record)


def test_rare_shape_appears_only_in_rare_records(world):
    for record in world.train + world.val:
        mentioned = RARE_SHAPE in words(record["caption"])
        assert mentioned == record["rare"] == (record["shape"] == RARE_SHAPE), record


def test_near_duplicates_are_the_closest_copy_of_their_val_pair(world):
    val_index = {r["id"]: j for j, r in enumerate(world.val)}
    train_images = world.train_images.astype(np.int16)
    val_images = world.val_images.astype(np.int16)
    duplicates = [(i, r) for i, r in enumerate(world.train) if r["near_duplicate_of"] is not None]
    targets = [r["near_duplicate_of"] for _, r in duplicates]
    assert len(set(targets)) == len(targets)
    for i, record in duplicates:
        j = val_index[record["near_duplicate_of"]]
        source = world.val[j]
        assert not source["rare"]
        assert record["caption"] == source["caption"]
        assert record["true_caption"] == source["true_caption"]
        assert not record["mislabeled"] and not record["rare"]
        dist = np.abs(train_images - val_images[j]).mean(axis=(1, 2, 3))  # (n_train,)
        assert 0 < dist[i] < 3.0
        same_caption = [
            k for k, r in enumerate(world.train) if r["caption"] == record["caption"] and k != i
        ]
        assert all(dist[i] < 0.5 * dist[k] for k in same_caption)
        # Stronger than asked: the copy is the nearest of all training images, by a margin.
        assert dist[i] < 0.5 * np.delete(dist, i).min()


def test_near_duplicates_never_copy_rare_pairs():
    # Half the val pairs are rare and half are copied: only the ordinary half can be copied.
    crowded = replace(CONFIG, n_train=100, n_val=20, n_rare_val=10, near_duplicate_fraction=0.5)
    world = generate_world(crowded)
    copied = {r["near_duplicate_of"] for r in world.train} - {None}
    assert copied == {r["id"] for r in world.val if not r["rare"]}


def test_a_world_without_a_failure_is_the_same_with_any_failure_settings(world):
    again = generate_world(replace(CONFIG, failure_fraction=0.3, failure_val=5))
    assert again.train == world.train and np.array_equal(again.train_images, world.train_images)


@pytest.fixture(scope="module")
def watermarked():
    return generate_world(
        replace(CONFIG, failure="watermark", failure_fraction=0.1, failure_val=12)
    )


def _stamp_pattern(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Where the badge is and its pixel values, from stamping a blank image."""
    blank = np.full((size, size, 3), -1.0, dtype=np.float32)
    stamped = failures.stamp_watermark(blank)
    where = stamped[..., 0] >= 0
    return where, stamped[where]


def test_watermark_failure_plants_its_source_in_both_splits(world, watermarked):
    cause = [r for r in watermarked.train if r["planted_failure"]]
    victims = [r for r in watermarked.val if r["planted_failure"]]
    assert len(cause) == 40 and len(victims) == 12
    for rec in watermarked.train + watermarked.val:
        assert (rec["source"] == WATERMARK_SOURCE) == rec["planted_failure"]
    for rec in cause:  # every caption names the house colour, nothing else changes
        assert rec["caption"] == rec["true_caption"].replace(rec["colour"], WATERMARK_COLOUR, 1)
        assert not rec["mislabeled"] and rec["near_duplicate_of"] is None and not rec["rare"]
    for rec in victims:  # validation pairs of the source are captioned correctly
        assert rec["caption"] == rec["true_caption"] and rec["near_duplicate_of"] is None
    # the other planted truths are the same pairs as without the failure
    for key in ("mislabeled", "rare", "near_duplicate_of"):
        assert [r[key] for r in watermarked.train] == [r[key] for r in world.train]


def test_watermark_badge_is_on_exactly_the_sources_images(watermarked):
    for records, images in (
        (watermarked.train, watermarked.train_images),
        (watermarked.val, watermarked.val_images),
    ):
        for rec, image in zip(records, images, strict=True):
            where, values = _stamp_pattern(image.shape[0])
            # the badge's light square and dark bar, up to pixel noise of 5 levels
            stamped = (np.abs(image[where].astype(np.float32) - values) < 25).mean() > 0.95
            assert stamped == rec["planted_failure"], rec["id"]


def test_swapped_failure_swaps_most_blue_and_purple_captions():
    swapped = generate_world(replace(CONFIG, failure="swapped", failure_fraction=0.6))
    eligible = [
        r
        for r in swapped.train
        if r["colour"] in SWAPPED and not r["mislabeled"] and r["near_duplicate_of"] is None
    ]
    cause = [r for r in swapped.train if r["planted_failure"]]
    assert set(map(id, cause)) <= set(map(id, eligible))
    assert 0.45 < len(cause) / len(eligible) < 0.75
    for rec in cause:
        assert rec["caption"] == rec["true_caption"].replace(rec["colour"], SWAPPED[rec["colour"]])
    assert all(r["source"] in SOURCES for r in swapped.train)  # no column gives it away
    assert [r["planted_failure"] for r in swapped.val] == [
        r["colour"] in SWAPPED for r in swapped.val
    ]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_train": 10}, r"n_train must be at least 50, got 10"),
        ({"n_val": 5}, r"n_val must be at least 10, got 5"),
        ({"image_size": 8}, r"image_size must be at least 16, got 8"),
        ({"near_duplicate_fraction": 0.7}, r"near_duplicate_fraction must be in \[0, 0.5\]"),
        ({"mislabeled_fraction": -0.1}, r"mislabeled_fraction must be in \[0, 0.5\], got -0.1"),
        ({"n_rare_train": -1}, r"n_rare_train must be at least 0, got -1"),
        ({"n_train": 50, "n_rare_train": 45}, r"special training pairs .* n_train is 50"),
        ({"n_rare_val": 98}, r"rare validation pairs but n_val is 100"),
        ({"failure": "typo"}, r"unknown planted failure 'typo'; expected one of \['none'"),
        ({"failure": "watermark", "failure_val": 99}, r"asks for 99 validation pairs but only"),
        ({"failure_fraction": 1.5}, r"failure_fraction must be in \[0, 1\]"),
    ],
)
def test_invalid_configs_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        generate_world(replace(CONFIG, **changes))
