"""faiss indexes of a run, checked against numpy brute force and traker's own scores."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from engine.attribution.settings import BuildConfig
from engine.errors import RunError
from engine.files import read_json, save_npy
from engine.run.layout import RunLayout
from engine.run.manifest import Counts, Manifest, write_manifest
from engine.search.faiss_ops import (
    IndexConfig,
    build_index,
    faiss_threads,
    flat_index,
    nearest,
    recall_at_k,
    search,
    top_influencers,
    trak_vectors,
    tune_nprobe,
)
from engine.search.run_indexes import (
    EMBEDDING_INDEXES,
    INDEX_NAMES,
    build_run_indexes,
    load_index,
    trak_query_vectors,
    trak_train_vectors,
)

K = 10


def _copy(run: Path, dest: Path) -> Path:
    """A private copy of a run without its indexes, so that tests may build them or break
    files in it."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("index"))
    return dest


def _trak_arrays(run: Path, n_models: int) -> tuple[np.ndarray, np.ndarray]:
    """Training vectors and val target queries straight from traker's memmaps."""
    feats = [np.load(RunLayout(run).trak_features(m)) for m in range(n_models)]
    o2l = [np.load(RunLayout(run).trak_out_to_loss(m)) for m in range(n_models)]
    grads = [np.load(RunLayout(run).trak_target_grads(m)) for m in range(n_models)]
    vectors = np.hstack(feats) * (sum(o2l) / n_models) / n_models  # (n_train, M*k)
    return vectors.astype(np.float32), np.hstack(grads).astype(np.float32)  # (n_val, M*k)


@pytest.fixture(scope="module")
def built(run_dir, tmp_path_factory) -> tuple[Path, dict]:
    run = _copy(run_dir, tmp_path_factory.mktemp("indexed") / "run")
    return run, build_run_indexes(run)


def test_trak_vectors_follow_trakers_formula():
    f0, f1 = np.array([[1.0, 2.0], [0.0, -1.0]]), np.array([[3.0, 4.0], [2.0, 5.0]])
    o0, o1 = np.array([[0.5], [0.2]]), np.array([[0.1], [0.6]])
    g0, g1 = np.array([1.0, -1.0]), np.array([0.5, 2.0])
    v = trak_vectors([f0, f1], [o0, o1])  # (2, 4)
    # traker's finalize_scores: mean_m(phi_m . g_m) * mean_m(out_to_loss_m)
    expected = (f0 @ g0 + f1 @ g1) / 2 * (o0[:, 0] + o1[:, 0]) / 2
    assert v.shape == (2, 4) and v.dtype == np.float32
    np.testing.assert_allclose(v @ np.concatenate([g0, g1]), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="one features and one out_to_loss array per checkpoint"):
        trak_vectors([f0, f1], [o0])


def test_an_index_of_trak_vectors_gives_brute_force_influencers_and_the_runs_scores(built):
    run, meta = built
    n_models = read_json(RunLayout(run).manifest)["counts"]["n_checkpoints"]
    vectors, targets = _trak_arrays(run, n_models)
    scores = np.load(RunLayout(run).scores)  # (n_train, n_val)
    np.testing.assert_allclose(trak_train_vectors(run), vectors, rtol=1e-6)
    np.testing.assert_allclose(trak_query_vectors(run), targets, rtol=1e-6)
    assert "trak" not in meta["indexes"]  # queries scan the features: no index is built
    trak = flat_index(trak_train_vectors(run))
    assert trak.ntotal == scores.shape[0]
    scale = float(np.abs(scores).max())
    for j in range(targets.shape[0]):
        pos_ids, pos_s, neg_ids, neg_s = top_influencers(trak, targets[j], K)
        brute = vectors.astype(np.float64) @ targets[j]  # (n_train,)
        order = np.argsort(-brute, kind="stable")
        np.testing.assert_array_equal(pos_ids, order[:K])
        np.testing.assert_array_equal(neg_ids, order[::-1][:K])
        np.testing.assert_allclose(pos_s, brute[pos_ids], rtol=1e-4, atol=1e-6 * scale)
        # the decomposition: signed index scores are traker's scores for this val pair
        np.testing.assert_allclose(pos_s, scores[pos_ids, j], rtol=1e-4, atol=1e-6 * scale)
        np.testing.assert_allclose(neg_s, scores[neg_ids, j], rtol=1e-4, atol=1e-6 * scale)
        assert neg_s[0] == pytest.approx(scores[:, j].min(), rel=1e-4, abs=1e-6 * scale)
        assert np.all(np.diff(pos_s) <= 0) and np.all(np.diff(neg_s) >= 0)


def test_embedding_indexes_match_numpy_cosine_neighbours(built):
    run, meta = built
    for name, (split, modality) in EMBEDDING_INDEXES.items():
        emb = np.load(RunLayout(run).embeddings(split, modality))  # (n, M*d)
        other = "val" if split == "train" else "train"
        queries = np.load(RunLayout(run).embeddings(other, "text"))[:15]
        info = meta["indexes"][name]
        assert (info["kind"], info["n"], info["dim"]) == ("flat-ip", *emb.shape)
        assert info["recall_at_10"] is None
        sims, ids = nearest(load_index(run, name), 3.0 * queries, K)
        unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        brute = unit.astype(np.float64) @ emb.T  # (15, n)
        # the same top-k cosines, and each returned id has its cosine (ids agree up to ties)
        np.testing.assert_allclose(sims, -np.sort(-brute, axis=1)[:, :K], atol=1e-5)
        np.testing.assert_allclose(np.take_along_axis(brute, ids, 1), sims, atol=1e-5)
        assert np.all([len(set(row)) == K for row in ids.tolist()])


def _clustered(rng: np.random.Generator, n: int, centers: np.ndarray, spread: float) -> np.ndarray:
    labels = rng.integers(len(centers), size=n)
    noise = rng.standard_normal((n, centers.shape[1]), dtype=np.float32)
    return centers[labels] + spread / np.sqrt(centers.shape[1]) * noise


def _save_mmap(path: Path, array: np.ndarray) -> None:
    """An npy file under traker's .mmap name (np.save on a name would append .npy)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array))


def _synthetic_run(root: Path, n_train: int, n_val: int, dim: int, seed: int = 0) -> Path:
    """A run directory with clustered embeddings and TRAK arrays (M=2, k=dim/2), no model."""
    rng = np.random.default_rng(seed)
    n_models, k = 2, dim // 2
    centers = rng.standard_normal((200, dim), dtype=np.float32) / np.sqrt(dim)
    for split, n in (("train", n_train), ("val", n_val)):
        for modality in ("image", "text"):
            emb = _clustered(rng, n, centers, 0.6)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            save_npy(RunLayout(root).embeddings(split, modality), emb)
    feats = _clustered(rng, n_train, centers, 0.6)
    grads = _clustered(rng, n_val, centers, 0.6)
    for m in range(n_models):
        _save_mmap(RunLayout(root).trak_features(m), feats[:, m * k : (m + 1) * k])
        _save_mmap(RunLayout(root).trak_target_grads(m), grads[:, m * k : (m + 1) * k])
        weights = rng.uniform(0.2, 1.0, size=(n_train, 1)).astype(np.float32)
        _save_mmap(RunLayout(root).trak_out_to_loss(m), weights)
    counts = Counts(n_train, n_val, n_models, k, ensemble_embedding_dim=dim)
    write_manifest(RunLayout(root), Manifest(BuildConfig(), counts, checkpoints=[]))
    return root


def test_approximate_index_records_its_measured_recall(tmp_path):
    run = _synthetic_run(tmp_path / "big", n_train=50_000, n_val=300, dim=256)
    meta = build_run_indexes(run, approx_threshold=10_000)
    on_disk = read_json(RunLayout(run).index_meta)
    assert on_disk == meta
    vectors, targets = _trak_arrays(run, 2)
    queries = np.vstack([targets, -targets])
    _, trak_info = build_index(vectors, IndexConfig(approx_threshold=10_000), queries, "val ±q")
    for info in (on_disk["indexes"]["train_image"], on_disk["indexes"]["train_text"], trak_info):
        assert info["kind"] == "ivf-flat-ip" and info["n"] == 50_000
        params = info["params"]
        # truly approximate: fewer lists scanned than exist, and recall measured, not assumed
        assert params["nlist"] == round(np.sqrt(50_000))
        assert params["nprobe"] < params["nlist"]
        assert 0.9 <= info["recall_at_10"] <= 1.0
        assert info["recall_queries"]
    assert on_disk["indexes"]["val_image"]["kind"] == "flat-ip"

    # an independent recall on all val targets (+q and -q) agrees with the recorded one
    ivf, _ = build_index(vectors, IndexConfig(approx_threshold=10_000), queries, "val ±q")
    assert faiss.extract_index_ivf(ivf).nprobe == trak_info["params"]["nprobe"]
    brute = queries @ vectors.T  # (2 n_val, n_train)
    truth = np.argsort(-brute, axis=1)[:, :K]
    hits = _recall(search(ivf, queries, K)[1], truth)
    assert hits >= 0.9
    assert abs(hits - trak_info["recall_at_10"]) < 0.05
    # the tuner picks the smallest power-of-two nprobe reaching the target, and says its recall
    nprobe, recall = tune_nprobe(faiss.extract_index_ivf(ivf), queries, truth, 0.97)
    assert recall == pytest.approx(_recall(search(ivf, queries, K)[1], truth))
    assert recall >= 0.97 and nprobe & (nprobe - 1) == 0
    faiss.extract_index_ivf(ivf).nprobe = nprobe // 2
    assert _recall(search(ivf, queries, K)[1], truth) < 0.97
    # IVF-Flat scores found vectors exactly: signed scores are still true TRAK scores
    pos_ids, pos_s, neg_ids, neg_s = top_influencers(ivf, targets[0], K)
    np.testing.assert_allclose(pos_s, vectors[pos_ids] @ targets[0], rtol=1e-4)
    np.testing.assert_allclose(neg_s, vectors[neg_ids] @ targets[0], rtol=1e-4)
    assert neg_s.max() < 0 < pos_s.min()


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) for f, t in zip(found, truth, strict=True)]) / K)


def test_recall_at_k_counts_shared_ids():
    found, truth = np.array([[1, 2, 3], [4, 5, 6]]), np.array([[1, 2, 9], [6, 5, 4]])
    assert recall_at_k(found, truth) == pytest.approx((2 / 3 + 1) / 2)


def _mtimes(run: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in RunLayout(run).index_dir.iterdir()}


def test_build_is_idempotent_and_follows_changed_sources(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path / "run")
    first = build_run_indexes(run)
    stamps = _mtimes(run)
    assert set(stamps) == {f"{n}.faiss" for n in INDEX_NAMES} | {"index.json"}
    assert build_run_indexes(run) == first
    assert _mtimes(run) == stamps  # nothing rewritten, index.json included

    # a changed source rebuilds that index only
    text = np.load(RunLayout(run).embeddings("train", "text"))
    perm = np.random.default_rng(0).permutation(len(text))
    save_npy(RunLayout(run).embeddings("train", "text"), text[perm])
    build_run_indexes(run)
    changed = {k for k, v in _mtimes(run).items() if stamps[k] != v}
    assert changed == {"train_text.faiss", "index.json"}
    _, ids = nearest(load_index(run, "train_text"), text[perm[5]], 1)
    assert ids[0, 0] == 5

    # a rebuild from scratch is deterministic
    probe = np.ones((2, first["indexes"]["train_image"]["dim"]))
    before = search(load_index(run, "train_image"), probe, K)
    build_run_indexes(run, overwrite=True)
    assert all(_mtimes(run)[k] != stamps[k] for k in stamps if k != "train_text.faiss")
    after = search(load_index(run, "train_image"), probe, K)
    np.testing.assert_array_equal(before[1], after[1])


def test_missing_arrays_are_named_with_the_fix(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path / "run")
    with pytest.raises(RunError, match=r"index\.json.*`trakview build`"):
        load_index(run, "train_image")
    os.unlink(RunLayout(run).trak_features(1))
    with pytest.raises(RunError, match=r"trak/1/features\.mmap.*run `trakview build`"):
        trak_train_vectors(run)
    os.unlink(RunLayout(run).embeddings("val", "image"))
    with pytest.raises(RunError, match=r"val_image_emb\.npy.*`trakview"):
        build_run_indexes(run)
    assert not RunLayout(run).index_dir.exists()  # checked before anything was built


def test_search_helpers_check_their_input(built):
    run, _ = built
    trak = flat_index(trak_train_vectors(run))
    q = np.ones(trak.d, dtype=np.float32)
    with pytest.raises(ValueError, match=rf"expected vectors of shape \(n, {trak.d}\).*\(3,\)"):
        search(trak, np.ones(3), K)
    with pytest.raises(ValueError, match="one query vector, received 2"):
        top_influencers(trak, np.vstack([q, q]), K)
    with pytest.raises(ValueError, match="unknown index 'nope'"):
        load_index(run, "nope")
    scores, ids = search(trak, q, 10 * trak.ntotal)  # more than the index holds
    assert ids.shape == (1, trak.ntotal) and sorted(ids[0].tolist()) == list(range(trak.ntotal))
    threads = faiss.omp_get_max_threads()
    with faiss_threads(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == threads
    one = top_influencers(trak, q, K, threads=1)
    assert faiss.omp_get_max_threads() == threads
    np.testing.assert_array_equal(one[0], top_influencers(trak, q, K)[0])


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="checks the fallback of a machine without GPU")
def test_cuda_request_without_gpu_stays_on_cpu(built, caplog):
    run, _ = built
    with caplog.at_level(logging.WARNING, logger="engine.search.faiss_ops"):
        index = load_index(run, "train_image", device="cuda")
    assert isinstance(index, faiss.IndexFlatIP)
    assert "faiss sees no GPU" in caplog.text


@pytest.mark.cuda
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="needs faiss with a GPU")
def test_gpu_index_gives_the_cpu_results(built):
    run, _ = built
    queries = np.load(RunLayout(run).embeddings("val", "image"))
    cpu = search(load_index(run, "train_image"), queries, K)
    gpu = search(load_index(run, "train_image", device="cuda"), queries, K)
    assert "Gpu" in type(load_index(run, "train_image", device="cuda")).__name__
    np.testing.assert_array_equal(cpu[1], gpu[1])
    np.testing.assert_allclose(cpu[0], gpu[0], rtol=1e-4, atol=1e-6)


def test_caption_ranks_in_blocks_equal_the_full_matrix():
    from engine.models.embed import caption_ranks

    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(2, 1500, 16)).astype(np.float32)
    sim = img @ txt.T
    expected = 1 + (sim > np.diag(sim)[:, None]).sum(axis=1)
    assert np.array_equal(caption_ranks(img, txt, block=333), expected)
