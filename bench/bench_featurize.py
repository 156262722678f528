"""Featurize throughput: trakview's engine against traker's stock CLIP pipeline, side by side.

Same model (trakview-tiny, 3.3 M parameters), same pairs (the demo world), same proj_dim, same
attributed parameters, same simulated batch size, float32, CPU. traker's stock pipeline is run as
the seed tutorial does, with only the fixes it needs to run at all on CPU: the embeddings are set
without ``get_embeddings`` (which calls ``.cuda()``), and the out-to-loss term is reshaped to
(B, 1).

Prints a table and writes it into BENCHMARKS.md (section ``bench_featurize``).

    python bench/bench_featurize.py [--pairs 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from trak import TRAKer
from trak.modelout_functions import CLIPModelOutput

from bench_common import machine, write_section
from engine import models, synthetic
from engine.attribute import featurize_checkpoint
from engine.embed import encode
from engine.trak import (
    ClipMargin,
    KeyedProjector,
    RegularizedScoreComputer,
    SelectiveGradientComputer,
    SimulatedBatch,
    select_parameters,
)

PROJ_DIM = 512
SIM_BS = 256
BATCH = 50
KINDS = (
    "gaussian",
    "gaussian-bf16",
    "sketch",
)  # trakview's --projector choices; sketch = CPU default


class StockClipOnCpu(CLIPModelOutput):
    """traker's CLIPModelOutput with the one fix featurize needs: out-to-loss shaped (B, 1)."""

    def get_out_to_loss_grad(self, model, weights, buffers, batch):
        return super().get_out_to_loss_grad(model, weights, buffers, batch).reshape(-1, 1)


def stock(model, images, tokens, img_emb, txt_emb, names, save_dir) -> float:
    """Seconds to featurize every pair with traker's stock gradient computer and projector."""
    task = StockClipOnCpu(simulated_batch_size=SIM_BS)
    # what get_embeddings would store, minus its hard-coded .cuda()
    CLIPModelOutput.image_embeddings = img_emb
    CLIPModelOutput.text_embeddings = txt_emb
    CLIPModelOutput.num_computed_embeddings = len(img_emb)
    traker = TRAKer(
        model=model,
        task=task,
        train_set_size=len(images),
        save_dir=save_dir,
        device="cpu",
        proj_dim=PROJ_DIM,
        use_half_precision=False,
        grad_wrt=names,
        logging_level=logging.ERROR,
    )
    traker.load_checkpoint(model.state_dict(), model_id=0)
    t0 = time.perf_counter()
    for s in range(0, len(images), BATCH):
        traker.featurize(
            batch=(images[s : s + BATCH], tokens[s : s + BATCH]),
            num_samples=min(BATCH, len(images) - s),
        )
    return time.perf_counter() - t0


def ours(model, images, tokens, img_emb, txt_emb, names, save_dir, kind) -> tuple[float, float]:
    """(setup seconds: projection matrix, featurize seconds) with trakview's extension points."""
    task = ClipMargin()
    task.set_embeddings(img_emb, txt_emb)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if n in names}
    token = next((n for n in names if n.endswith("token_embedding.weight")), None)
    projector = KeyedProjector(
        shapes,
        token,
        PROJ_DIM,
        seed=0,
        sketch_dim=4 * PROJ_DIM if kind == "sketch" else 0,
        matmul_dtype=torch.bfloat16 if kind == "gaussian-bf16" else torch.float32,
    )
    t0 = time.perf_counter()
    if projector.dense_names:
        projector._project_dense({n: torch.zeros(1, *shapes[n]) for n in projector.dense_names})
    setup = time.perf_counter() - t0
    traker = TRAKer(
        model=model,
        task=task,
        train_set_size=len(images),
        save_dir=save_dir,
        device="cpu",
        gradient_computer=SelectiveGradientComputer,
        projector=projector,
        score_computer=RegularizedScoreComputer,
        use_half_precision=False,
        grad_wrt=names,
        lambda_reg=None,
        logging_level=logging.ERROR,
    )
    sim = SimulatedBatch(len(images), SIM_BS, seed=0)
    t0 = time.perf_counter()
    featurize_checkpoint(traker, model.state_dict(), 0, images, tokens, sim, BATCH)
    return setup, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument(
        "--stock-all-pairs",
        type=int,
        default=200,
        help="pairs for stock traker with all parameters (12 s per 100 pairs)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)

    world = synthetic.generate_world(synthetic.WorldConfig(n_train=max(args.pairs, 300), n_val=30))
    bundle = models.create("trakview-tiny", seed=0)
    model = bundle.model
    images = torch.stack([bundle.preprocess(Image.fromarray(a)) for a in world.train_images])
    tokens = bundle.tokenizer([r["caption"] for r in world.train])
    images, tokens = images[: args.pairs], tokens[: args.pairs]
    img_emb, txt_emb = encode(model, images, tokens)

    rows = []
    for label, grad_params, n_stock in (
        ("default (no token embedding)", "no-token-embedding", args.pairs),
        ("all parameters", "all", args.stock_all_pairs),
    ):
        names = select_parameters(model, grad_params)
        n_params = sum(p.numel() for n, p in model.named_parameters() if n in names)
        t_stock, setups = [], []
        t_ours: dict[str, list[float]] = {k: [] for k in KINDS}
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as d:
                t_stock.append(
                    stock(
                        model,
                        images[:n_stock],
                        tokens[:n_stock],
                        img_emb,
                        txt_emb,
                        names,
                        str(Path(d) / "s"),
                    )
                )
                for kind in KINDS:
                    setup, t = ours(
                        model, images, tokens, img_emb, txt_emb, names, str(Path(d) / kind), kind
                    )
                    t_ours[kind].append(t)
                    setups.append(setup)
        stock_rate = n_stock / statistics.median(t_stock)
        row = [label, f"{n_params:,}", f"{stock_rate:.1f}"]
        for kind in KINDS:
            rate = args.pairs / statistics.median(t_ours[kind])
            row += [f"{rate:.0f} ({rate / stock_rate:.1f}x)"]
        rows.append(tuple(row))
        print(" | ".join(row), flush=True)

    header = (
        "parameters",
        "attributed params",
        "stock traker pairs/s",
        *(f"trakview {k} pairs/s (speed-up)" for k in KINDS),
    )
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table]
    print("\n".join(lines))
    md = "\n".join(
        ["| " + " | ".join(r) + " |" for r in table[:1]]
        + ["|" + "---|" * len(header)]
        + ["| " + " | ".join(r) + " |" for r in table[1:]]
    )
    note = (
        f"Featurize throughput per checkpoint, {args.pairs} demo pairs (stock traker with all "
        f"parameters: {args.stock_all_pairs} pairs), proj_dim {PROJ_DIM}, simulated batch "
        f"{SIM_BS}, batch {BATCH}, float32 features, trakview-tiny; trakview with each --projector; median of {args.repeats} runs, both "
        f"pipelines in the same process, alternating. {machine()}. "
        "`python bench/bench_featurize.py`"
    )
    write_section(
        "bench_featurize", f"### Featurize: trakview vs traker's stock pipeline\n\n{note}\n\n{md}\n"
    )
    np.set_printoptions()


if __name__ == "__main__":
    main()
