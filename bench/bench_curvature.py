"""Curvature estimators tried on every parameter's full per-sample gradient: the harness behind
the estimators that were built (``--estimator modules``, ``--output loss``) and the one that was
not (EK-FAC), scored by LDS against a run's own ``eval lds`` models.

Small models only (the demo's: 157,441 attributed parameters): the gradients are written in full.

    python bench/bench_curvature.py dump  --run RUN --out GRADS [--checkpoints 2,5]
    python bench/bench_curvature.py score --grads GRADS --out SCORES [--checkpoints 2,5]
    python bench/bench_curvature.py lds   --run RUN --scores SCORES [--checkpoints 2,5]

``dump`` writes per checkpoint each training pair's gradient of the margin (``margin``) and of
its contrastive loss at the model's temperature (``loss``, ``--output loss``), and each validation
pair's margin gradient, float16 (0.9 GB per checkpoint and output on the demo). ``score`` makes
(n_train, n_val) score matrices per checkpoint:

* ``joint``: x_i^T (X^T X + lambda I)^-1 g over every parameter, no projection (kernel form:
  (K + lambda I)^-1 X g with K = X X^T);
* ``permod``: the same per module (block-diagonal), summed;
* ``pmproj{k}``: per module projected to min(D, k) Gaussian dimensions first (what ``--estimator
  modules`` builds);
* ``ekfac`` / ``kfac``: per weight matrix the Shampoo factors L = E[G G^T], R = E[G^T G] of its
  per-sample gradients G (bias as an extra column), their eigenbases, and the eigenvalues
  corrected per coordinate (EK-FAC: E[(U_L^T G U_R)^2]) or their products (K-FAC); small modules
  exactly; (F + lambda)^-1 then applied to the training side;
* ``ekfacsym{k}``: EK-FAC whitening (F + lambda)^-1/2 of both sides, then one Gaussian
  projection to k dimensions (what a run could keep of it); ``proj{k}``: TRAK's joint X^T X in a
  Gaussian projection.

lambda = alpha x the mean eigenvalue (alpha in the name, ``-a0.001``). ``lds`` averages the
checkpoints' matrices (times the mean out-to-loss weight for the margin, as TRAK does) and scores
each against the run's retrained subset models, paired with the run's own scores.
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch

from bench_common import arguments
from engine import files
from engine.attribution.gradients import SelectiveGradientComputer, select_parameters
from engine.attribution.margin import ClipLoss, ClipMargin, SimulatedBatch
from engine.attribution.projection import module_groups
from engine.data.loading import loader
from engine.data.pairs import read_pairs
from engine.evaluate import stats
from engine.evaluate.lds import load_lds_cache
from engine.models.checkpoints import read_state_dict
from engine.models.factory import create
from engine.run.layout import RunLayout
from engine.run.manifest import open_manifest

ALPHAS = (1e-3, 1e-1, 1.0)


def dump(run: Path, out: Path, ckpts: list[int]) -> None:
    layout, manifest = RunLayout(run), open_manifest(run)
    cfg = manifest.config
    bundle = create(cfg.model)
    model = bundle.model
    names = select_parameters(model, cfg.grad_params)
    pairs = {s: read_pairs(layout.pairs(s)) for s in ("train", "val")}
    sim = SimulatedBatch(len(pairs["train"]), cfg.sim_batch_size, seed=cfg.seed)
    shapes = {n: list(p.shape) for n, p in model.named_parameters() if n in names}
    files.write_json(out / "names.json", shapes)
    paths = manifest.checkpoint_paths(run)
    for m in ckpts:
        model.load_state_dict(read_state_dict(paths[m]))
        emb = [
            torch.from_numpy(files.load_npy(layout.checkpoint_embeddings("train", mod, m)))
            for mod in ("image", "text")
        ]
        for output, task_type, split in (
            ("margin", ClipMargin, "train"),
            ("loss", ClipLoss, "train"),
            ("margin", ClipMargin, "val"),
        ):
            dest = out / output / f"{m:02d}_{split}.npy"
            if dest.is_file():
                continue
            task = task_type()
            task.set_embeddings(*emb)
            comp = SelectiveGradientComputer(model, task, 0, torch.float32, "cpu", grad_wrt=names)
            rows, t0 = [], time.perf_counter()
            for inds, x, tok in loader(pairs[split], bundle.preprocess, bundle.tokenizer, 50, 0):
                idx = sim.for_train(inds, m) if split == "train" else sim.for_targets(len(inds), m)
                g = comp.compute_per_sample_grad((x, tok, idx))["dense"]
                rows.append(torch.cat([g[n].reshape(len(inds), -1) for n in names], 1).half())
            files.save_npy(dest, torch.cat(rows).numpy())
            print(m, output, split, f"{time.perf_counter() - t0:.0f} s", flush=True)


def _gaussian(rows: int, k: int, key: object) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))
    return torch.randn(rows, k, generator=g) / k**0.5


def _solve(K: torch.Tensor, B: torch.Tensor, lam: float) -> torch.Tensor:
    eye = torch.eye(K.shape[0], dtype=K.dtype)
    return torch.cholesky_solve(B, torch.linalg.cholesky(K + lam * eye))


def _modules(shapes: dict[str, list[int]]) -> list[tuple[str, np.ndarray, tuple | None]]:
    """(module, columns, (rows, cols, weight offset, bias offset or None) for a matrix)."""
    offsets, off = {}, 0
    for n, s in shapes.items():
        offsets[n] = (off, int(np.prod(s)) if s else 1)
        off += offsets[n][1]
    out = []
    for mod, members in module_groups(list(shapes)).items():
        cols = np.concatenate([np.arange(offsets[n][0], sum(offsets[n])) for n in members])
        mats = [n for n in members if len(shapes[n]) >= 2 and "positional" not in n]
        bias = [n for n in members if len(shapes[n]) == 1]
        view = None
        if len(mats) == 1:
            r = shapes[mats[0]][0]
            view = (
                r,
                offsets[mats[0]][1] // r,
                offsets[mats[0]][0],
                offsets[bias[0]][0] if bias else None,
            )
        out.append((mod, cols, view))
    return out


def _matrices(X: torch.Tensor, view: tuple) -> torch.Tensor:
    r, c, w, b = view
    M = X[:, w : w + r * c].reshape(-1, r, c)
    return M if b is None else torch.cat([M, X[:, b : b + r].reshape(-1, r, 1)], 2)


def score(grads: Path, out: Path, ckpts: list[int]) -> None:
    mods = _modules(json.loads((grads / "names.json").read_text()))
    out.mkdir(parents=True, exist_ok=True)

    def save(name: str, m: int, S: torch.Tensor) -> None:
        files.save_npy(out / f"{name}__{m:02d}.npy", S.float().numpy())

    for m in ckpts:
        G = torch.from_numpy(np.load(grads / "margin" / f"{m:02d}_val.npy").astype(np.float32))
        for output in ("margin", "loss"):
            t0 = time.perf_counter()
            X = torch.from_numpy(np.load(grads / output / f"{m:02d}_train.npy").astype(np.float32))
            n = X.shape[0]
            for k in (512, 2048):
                Xp = (X @ _gaussian(X.shape[1], k, ("p", k))).double()
                Gp = (G @ _gaussian(X.shape[1], k, ("p", k))).double()
                xtx = Xp.T @ Xp
                for a in ALPHAS:
                    save(
                        f"proj{k}-{output}-a{a:g}",
                        m,
                        Xp @ _solve(xtx, Gp.T, a * float(torch.trace(xtx)) / k),
                    )
            joint_K, joint_XG = 0, 0
            acc: dict[str, torch.Tensor | int] = {}
            sym = {a: [torch.zeros(n, 2048), torch.zeros(G.shape[0], 2048)] for a in ALPHAS}
            for mod, cols, view in mods:
                c = torch.from_numpy(cols)
                Xm, Gm = X[:, c].contiguous(), G[:, c].contiguous()
                if float((Xm**2).sum()) == 0 or float((Gm**2).sum()) == 0:
                    continue
                K, XG = (Xm @ Xm.T).double(), (Xm @ Gm.T).double()
                joint_K, joint_XG = joint_K + K, joint_XG + XG
                for a in ALPHAS:
                    key = f"permod-{output}-a{a:g}"
                    acc[key] = acc.get(key, 0) + _solve(K, XG, a * float(torch.trace(K)) / n)
                kk = min(len(cols), 512)
                P = _gaussian(len(cols), kk, ("pm", mod)) if kk < len(cols) else None
                Xq = (Xm @ P if P is not None else Xm).double()
                Gq = (Gm @ P if P is not None else Gm).double()
                xtx = Xq.T @ Xq
                key = f"pmproj512-{output}-a0.001"
                acc[key] = acc.get(key, 0) + Xq @ _solve(
                    xtx, Gq.T, 1e-3 * float(torch.trace(xtx)) / kk
                )
                if view is not None:
                    A = _matrices(X, view)
                    L = (torch.einsum("nij,nkj->ik", A, A) / n).double()
                    R = (torch.einsum("nji,njk->ik", A, A) / n).double()
                    el, Ul = torch.linalg.eigh(L)
                    er, Ur = torch.linalg.eigh(R)
                    Ah = (Ul.T.float() @ A @ Ur.float()).reshape(n, -1)
                    Bh = (Ul.T.float() @ _matrices(G, view) @ Ur.float()).reshape(G.shape[0], -1)
                    corrected = (Ah**2).mean(0)
                    kfac = torch.outer(el.clamp_min(0), er.clamp_min(0)).reshape(-1).float()
                    kfac = kfac / float((A**2).sum((1, 2)).mean())
                else:
                    F = (Xm.T @ Xm / n).double()
                    e, U = torch.linalg.eigh(F)
                    Ah, Bh = Xm @ U.float(), Gm @ U.float()
                    corrected = kfac = e.clamp_min(0).float()
                Pw = _gaussian(Ah.shape[1], 2048, ("ef", mod))
                for a in ALPHAS:
                    for name, lam in (("ekfac", corrected), ("kfac", kfac)):
                        d = lam + a * lam.mean()
                        key = f"{name}-{output}-a{a:g}"
                        acc[key] = acc.get(key, 0) + ((Ah / d) @ Bh.T).double()
                    d = (corrected + a * corrected.mean()).sqrt()
                    sym[a][0] += (Ah / d) @ Pw
                    sym[a][1] += (Bh / d) @ Pw
            for a in ALPHAS:
                save(
                    f"joint-{output}-a{a:g}",
                    m,
                    _solve(joint_K, joint_XG, a * float(torch.trace(joint_K)) / n),
                )
                save(f"ekfacsym2048-{output}-a{a:g}", m, sym[a][0] @ sym[a][1].T)
            for key, S in acc.items():
                save(key, m, S)
            print(m, output, f"{time.perf_counter() - t0:.0f} s", flush=True)


def lds(run: Path, scores: Path, ckpts: list[int]) -> None:
    masks, outputs = load_lds_cache(run)
    layout = RunLayout(run)
    q = np.mean([np.load(layout.trak_out_to_loss(m), mmap_mode="r")[:, 0] for m in ckpts], 0)
    preds = {
        "trak (the run, every checkpoint)": stats.subset_predictions(np.load(layout.scores), masks)
    }
    names = sorted({p.stem.split("__")[0] for p in scores.glob("*__*.npy")})
    for name in names:
        parts = [scores / f"{name}__{m:02d}.npy" for m in ckpts]
        if not all(p.is_file() for p in parts):
            continue
        S = np.mean([np.load(p) for p in parts], 0)
        if "-margin-" in name:
            S = S * q[:, None]
        preds[name] = stats.subset_predictions(S, masks)
    res = stats.bootstrap_lds(preds, outputs, 500, 0, 0.95, reference="proj512-margin-a0.001")
    for name, v in sorted(res.items(), key=lambda kv: -kv[1]["lds"]):
        diff = v.get("reference_minus_this")
        paired = (
            f"  vs proj512-margin-a0.001 {-diff['mean']:+.3f} [{-diff['ci'][1]:+.3f}, {-diff['ci'][0]:+.3f}]"
            if diff
            else ""
        )
        print(f"{name:40s} {v['lds']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]{paired}")


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("step", choices=("dump", "score", "lds"))
    parser.add_argument("--run", type=Path)
    parser.add_argument("--grads", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--scores", type=Path)
    parser.add_argument("--checkpoints", default="2,5")
    args = parser.parse_args()
    ckpts = [int(c) for c in args.checkpoints.split(",")]
    torch.set_num_threads(2)
    if args.step == "dump":
        dump(args.run.resolve(), args.out, ckpts)
    elif args.step == "score":
        score(args.grads, args.out, ckpts)
    else:
        lds(args.run.resolve(), args.scores, ckpts)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
