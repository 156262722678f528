"""faiss, arrays in and arrays out: exact and IVF inner-product indexes, search, TRAK vectors.

The TRAK score of an ensemble of M checkpoints (Park et al. 2023, "TRAK: Attributing Model
Behavior at Scale", Sec. 3), exactly as traker 0.3.2's ``TRAKer.finalize_scores`` computes it:

    score_i = (1/M) sum_m phi_m[i] . g_m  *  (1/M) sum_m Q_m[i]

with phi_m the finalized training features (x (X^T X + lambda I)^-1, ``trak/{m}/features.mmap``),
Q_m the out-to-loss weights and g_m the projected gradient of the target. With the training
vector v_i = concat_m(phi_m[i]) * mean_m(Q_m[i]) / M and the query q = concat_m(g_m) the score is
the inner product v_i . q: the top positive influencers are a maximum-inner-product search for q,
the top negative ones a search for -q.

Indexes (``RUN/index/NAME.faiss``, described in ``RUN/index/index.json``): ``trak`` over the
training vectors above, and ``train_image``, ``train_text``, ``val_image``, ``val_text`` over the
ensemble CLIP embeddings (unit rows, so inner product = mean cosine over checkpoints). Up to
``approx_threshold`` vectors an index is exact (``IndexFlatIP``); past it, IVF-Flat with inner
product, chosen over HNSW because it handles the unnormalised TRAK vectors (its lists are scanned
exactly, only the choice of lists is approximate), moves to the GPU, and trains
deterministically. Its recall@10 against exact search is measured at build time, and nprobe is
raised until it reaches a target. Finalized TRAK features are whitened by (X^T X)^-1 and have
little cluster structure, so on them IVF saves little (bench/bench_search.py measures it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from engine.errors import ConfigError

log = logging.getLogger(__name__)

RECALL_K = 10
ADD_CHUNK = 100_000  # vectors added to an IVF index per call, to bound temporary memory


@dataclass
class IndexConfig:
    """Settings of the search indexes (recorded per index in ``index.json``)."""

    approx_threshold: int = 200_000  # past this many vectors an IVF-Flat index replaces exact
    nlist: int = 0  # IVF lists; 0 = about sqrt(n), at most n / 39
    recall_target: float = 0.95  # nprobe = smallest power of two whose recall@10 reaches this
    recall_queries: int = 200  # sample queries on which recall@10 is measured
    train_points_per_list: int = 64  # k-means training sample per IVF list
    seed: int = 0  # k-means initialisation and the query sample


# --- compute: arrays in, arrays / indexes out ----------------------------------------------------


def trak_vectors(features: Sequence[np.ndarray], out_to_loss: Sequence[np.ndarray]) -> np.ndarray:
    """Training vectors whose inner product with concat_m(g_m) is the TRAK score.

    Args:
        features: per checkpoint, (n_train, k) finalized TRAK features.
        out_to_loss: per checkpoint, (n_train, 1) or (n_train,) out-to-loss weights.

    Returns:
        (n_train, M*k) float32: concat_m(features_m[i]) * mean_m(out_to_loss_m[i]) / M.
    """
    if not features or len(features) != len(out_to_loss):
        raise ValueError(
            f"expected one features and one out_to_loss array per checkpoint, received "
            f"{len(features)} and {len(out_to_loss)}"
        )
    n, k = features[0].shape
    n_models = len(features)
    weight = np.zeros(n, dtype=np.float64)  # (n_train,)
    for q in out_to_loss:
        weight += np.asarray(q, dtype=np.float64).reshape(n)
    weight /= n_models * n_models  # mean over checkpoints, and the 1/M of the mean of products
    w32 = weight.astype(np.float32)[:, None]  # (n_train, 1): a float64 factor would upcast blocks
    out = np.empty((n, n_models * k), dtype=np.float32)  # (n_train, M*k)
    for m, f in enumerate(features):
        if f.shape != (n, k):
            raise ValueError(
                f"features of checkpoint {m} have shape {f.shape}, expected {(n, k)} like "
                "checkpoint 0; the run's TRAK store is inconsistent, rebuild it"
            )
        np.multiply(np.asarray(f, dtype=np.float32), w32, out=out[:, m * k : (m + 1) * k])
    return out


def flat_index(vectors: np.ndarray) -> faiss.IndexFlatIP:
    """An exact inner-product index over (n, d) vectors."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(_as_queries(vectors, vectors.shape[1]))
    return index


def ivf_index(
    vectors: np.ndarray, nlist: int, points_per_list: int = 64, seed: int = 0
) -> faiss.IndexIVFFlat:
    """An IVF-Flat inner-product index, k-means trained on a seeded sample of the vectors.

    Args:
        vectors: (n, d) float32.
        nlist: number of inverted lists (k-means centroids).
        points_per_list: training sample size per list.
        seed: seeds the sample and the k-means initialisation.
    """
    n, d = vectors.shape
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.max_points_per_centroid = points_per_list
    n_sample = min(n, nlist * points_per_list)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=n_sample, replace=False))
    index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))  # (n_sample, d)
    for start in range(0, n, ADD_CHUNK):
        index.add(np.ascontiguousarray(vectors[start : start + ADD_CHUNK], dtype=np.float32))
    return index


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k by inner product without building an index (no copy of ``vectors``).

    Returns:
        (q, k) float32 scores, (q, k) int64 ids, best first.
    """
    k = min(k, vectors.shape[0])
    return faiss.knn(
        _as_queries(queries, vectors.shape[1]),
        np.ascontiguousarray(vectors, dtype=np.float32),
        k,
        metric=faiss.METRIC_INNER_PRODUCT,
    )


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found_q ∩ truth_q| / k, for (q, k) id arrays."""
    k = truth.shape[1]
    hits = [len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / k)


def tune_nprobe(
    index: faiss.IndexIVF, queries: np.ndarray, truth: np.ndarray, target: float
) -> tuple[int, float]:
    """Sets ``index.nprobe`` to the smallest power of two whose recall@k reaches ``target``.

    Args:
        index: a trained, filled IVF index.
        queries: (q, d) sample queries.
        truth: (q, k) exact top-k ids of the queries.
        target: the recall to reach (nprobe = nlist gives exact search, recall 1).

    Returns:
        The chosen nprobe and its measured recall@k.
    """
    nprobe = 1
    while True:
        index.nprobe = min(nprobe, index.nlist)
        _, ids = index.search(queries, truth.shape[1])
        recall = recall_at_k(ids, truth)
        if recall >= target or index.nprobe == index.nlist:
            return int(index.nprobe), recall
        nprobe *= 2


def resolve_nlist(n: int, nlist: int = 0) -> int:
    """The IVF list count: ``nlist`` or about sqrt(n), kept to at most n / 39 lists.

    faiss warns below 39 training points per centroid; sqrt(n) lists balance the cost of choosing
    lists (nlist inner products) against scanning them (n / nlist each).
    """
    wanted = nlist or int(round(math.sqrt(n)))
    return max(1, min(wanted, n // 39))


def build_index(
    vectors: np.ndarray,
    cfg: IndexConfig | None = None,
    queries: np.ndarray | None = None,
    query_desc: str = "",
) -> tuple[faiss.Index, dict[str, Any]]:
    """An inner-product index over ``vectors``: exact, or IVF-Flat past ``cfg.approx_threshold``.

    Args:
        vectors: (n, d) float32 database vectors.
        cfg: index settings.
        queries: (q, d) realistic queries for measuring the approximate index's recall@10; None =
            ``cfg.recall_queries`` random Gaussian directions.
        query_desc: what ``queries`` are, recorded with the recall.

    Returns:
        The index and its description: kind, params, n, dim, recall_at_10 and recall_queries
        (approximate only, else None), build_seconds.
    """
    cfg = cfg or IndexConfig()
    t0 = time.perf_counter()
    n, d = vectors.shape
    info: dict[str, Any] = {"metric": "inner_product", "n": int(n), "dim": int(d)}
    if n <= cfg.approx_threshold:
        index = flat_index(vectors)
        info.update(kind="flat-ip", params={}, recall_at_10=None, recall_queries=None)
    else:
        nlist = resolve_nlist(n, cfg.nlist)
        log.info("building IVF-Flat over %d x %d vectors with %d lists", n, d, nlist)
        index = ivf_index(vectors, nlist, cfg.train_points_per_list, cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        if queries is None or len(queries) == 0:
            queries = rng.standard_normal((cfg.recall_queries, d)).astype(np.float32)
            query_desc = f"{cfg.recall_queries} random Gaussian directions"
        elif len(queries) > cfg.recall_queries:
            queries = queries[np.sort(rng.choice(len(queries), cfg.recall_queries, replace=False))]
        queries = _as_queries(queries, d)
        _, truth = exact_search(vectors, queries, RECALL_K)
        nprobe, recall = tune_nprobe(index, queries, truth, cfg.recall_target)
        info.update(
            kind="ivf-flat-ip",
            params={
                "nlist": nlist,
                "nprobe": nprobe,
                "train_points": min(n, nlist * cfg.train_points_per_list),
                "kmeans_niter": int(index.cp.niter),
                "seed": cfg.seed,
                "recall_target": cfg.recall_target,
            },
            recall_at_10=round(recall, 4),
            recall_queries=query_desc or f"{len(queries)} given queries",
        )
        if nprobe * 2 > nlist:
            # Whitened TRAK features have little cluster structure: lists cut no work then.
            log.warning(
                "IVF needs nprobe %d of %d lists for recall@10 %.3f: about as slow as exact "
                "search on these vectors; a higher approx_threshold keeps the exact index",
                nprobe,
                nlist,
                recall,
            )
    info["build_seconds"] = round(time.perf_counter() - t0, 3)
    return index, info


# --- search ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def faiss_threads(threads: int | None) -> Iterator[None]:
    """Runs the block with ``threads`` OpenMP threads in faiss (None: leave as is), then restores.

    One thread is fastest for a single query on a small index (no thread start-up); a batch, or a
    [q, -q] pair on a large index, gains from more (see bench/bench_search.py).
    """
    if threads is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def search(
    index: faiss.Index, queries: np.ndarray, k: int, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product.

    Args:
        index: any faiss index (CPU or GPU).
        queries: (q, d) or (d,) vectors.
        k: results per query; more than the index holds gives all of them.
        threads: faiss OpenMP threads for this call (None: faiss's current setting).

    Returns:
        (q, k) float32 scores, best first, and (q, k) int64 ids.
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, received {k}")
    queries = _as_queries(queries, index.d)
    with faiss_threads(threads):
        return index.search(queries, min(k, index.ntotal))


def top_influencers(
    index: faiss.Index, query_vec: np.ndarray, k: int = 10, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The k most positive and k most negative TRAK influencers of one target.

    q and -q go to faiss as one batch of two (one pass over a flat index).

    Args:
        index: the ``trak`` index.
        query_vec: (M*k,) concat_m(g_m) of the target (see ``trak_query_vectors``).
        k: influencers per sign.
        threads: faiss OpenMP threads for this call.

    Returns:
        pos_ids (k,), pos_scores (k,) descending; neg_ids (k,), neg_scores (k,) ascending (most
        negative first). Scores are the signed TRAK scores; if fewer than k are positive, the
        positive list continues with the smallest negatives (and vice versa).
    """
    q = _as_queries(query_vec, index.d)
    if q.shape[0] != 1:
        raise ValueError(
            f"top_influencers takes one query vector, received {q.shape[0]}; call it per target "
            "or use search(index, queries, k) for a batch"
        )
    scores, ids = search(index, np.vstack([q, -q]), k, threads)  # (2, k)
    return ids[0], scores[0], ids[1], -scores[1]


def nearest(
    index: faiss.Index, vectors: np.ndarray, k: int = 10, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """CLIP neighbours: the k indexed embeddings with the highest cosine to each vector.

    Args:
        index: an embedding index (``train_image``, ``val_text``, ...) over unit vectors.
        vectors: (q, d) or (d,) query embeddings; normalised here, so any scale works.
        k: neighbours per query.

    Returns:
        (q, k) cosine similarities, best first, and (q, k) int64 ids.
    """
    q = _as_queries(vectors, index.d)
    norms = np.linalg.norm(q, axis=1, keepdims=True)  # (q, 1)
    if np.any(norms == 0):
        raise ValueError("nearest() received an all-zero query vector; it has no direction")
    return search(index, q / norms, k, threads)


def to_device(index: faiss.Index, device: str = "cpu") -> faiss.Index:
    """The index on ``device`` ("cpu", "cuda", "cuda:N"); on the CPU when faiss sees no GPU."""
    if not device.startswith("cuda"):
        return index
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n_gpus == 0 or not hasattr(faiss, "StandardGpuResources"):
        log.warning(
            "device %r asked for, but faiss sees no GPU (faiss-cpu, or no CUDA device): "
            "searching on the CPU; install trakview[gpu] on a CUDA machine for GPU search",
            device,
        )
        return index
    gpu = int(device.split(":", 1)[1]) if ":" in device else 0
    if gpu >= n_gpus:
        raise ConfigError(f"device {device!r} asked for, but faiss sees {n_gpus} GPU(s)")
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, gpu, index)
    gpu_index.referenced_objects = [res]  # the resources must outlive the index
    return gpu_index


def _as_queries(x: np.ndarray, d: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim not in (1, 2) or x.shape[-1] != d:
        raise ValueError(
            f"expected vectors of shape (n, {d}) or ({d},) for this index, received "
            f"{tuple(x.shape)}; query the index built over vectors of the same kind"
        )
    return np.ascontiguousarray(x.reshape(-1, d), dtype=np.float32)
