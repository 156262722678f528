"""Featurize throughput: trakview's engine against traker's stock CLIP pipeline, side by side.

Same model (trakview-tiny, 3.3 M parameters), same pairs (the demo world), same proj_dim, same
attributed parameters, same simulated batch size, float32, CPU. trakview runs as a featurize unit
of the build does (``engine.assemble.context.WorkContext``'s TRAKer: trakview's extension points),
with each ``--projector``. traker's stock pipeline is run as the seed tutorial does, with only the
fixes it needs to run at all on CPU: the embeddings are set without ``get_embeddings`` (which
calls ``.cuda()``), and the out-to-loss term is reshaped to (B, 1).

Prints a table and writes it into BENCHMARKS.md (section ``bench_featurize``).

    python bench/bench_featurize.py [--pairs 500] [--repeats 3]
    python bench/bench_featurize.py --pairs 100 --stock-all-pairs 20 --repeats 1 --no-write
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from bench_common import (
    InMemoryWork,
    arguments,
    machine,
    md_table,
    set_stock_embeddings,
    stock_traker,
    warm_up,
    write_section,
)
from engine.attribution.gradients import select_parameters
from engine.attribution.settings import BuildConfig
from engine.data import synthetic
from engine.models.embed import encode
from engine.models.factory import create

# both pipelines: proj_dim, simulated batch and pairs per gradient batch
SETTINGS = BuildConfig(model="trakview-tiny", proj_dim=512, sim_batch_size=256, batch_size=50)
PROJ_DIM, SIM_BS, BATCH = SETTINGS.proj_dim, SETTINGS.sim_batch_size, SETTINGS.batch_size
KINDS = (
    "gaussian",
    "gaussian-bf16",
    "sketch",
)  # trakview's --projector choices; sketch = CPU default


def stock(model, images, tokens, img_emb, txt_emb, names, save_dir: Path) -> float:
    """Seconds to featurize every pair with traker's stock gradient computer and projector."""
    set_stock_embeddings(img_emb, txt_emb)
    traker = stock_traker(model, names, len(images), save_dir, PROJ_DIM, SIM_BS)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    t0 = time.perf_counter()
    for s in range(0, len(images), BATCH):
        traker.featurize(
            batch=(images[s : s + BATCH], tokens[s : s + BATCH]),
            num_samples=min(BATCH, len(images) - s),
        )
    return time.perf_counter() - t0


def ours(bundle, images, tokens, img_emb, txt_emb, grad_params, kind) -> float:
    """Seconds to featurize every pair as a featurize unit of the build does (the projection
    drawn beforehand)."""
    cfg = replace(SETTINGS, grad_params=grad_params, projector=kind)
    work = InMemoryWork(cfg, bundle, img_emb, txt_emb)
    warm_up(work.projector)
    traker = work.traker(len(images))
    t0 = time.perf_counter()
    work.featurize(traker, bundle.model.state_dict(), 0, images, tokens)
    return time.perf_counter() - t0


def main() -> None:
    parser = arguments(__doc__)
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
    bundle = create(SETTINGS.model, seed=0)
    model = bundle.model
    images = torch.stack([bundle.preprocess(Image.fromarray(a)) for a in world.train_images])
    tokens = bundle.tokenizer([r["caption"] for r in world.train])
    # embeddings of at least 300 pairs: both margins draw simulated batches of 256 from them
    img_emb, txt_emb = encode(model, images, tokens)
    images, tokens = images[: args.pairs], tokens[: args.pairs]

    rows = []
    for label, grad_params, n_stock in (
        ("default (no token embedding)", "no-token-embedding", args.pairs),
        ("all parameters", "all", args.stock_all_pairs),
    ):
        names = select_parameters(model, grad_params)
        n_params = sum(p.numel() for n, p in model.named_parameters() if n in names)
        t_stock = []
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
                        Path(d),
                    )
                )
            for kind in KINDS:
                t_ours[kind].append(
                    ours(bundle, images, tokens, img_emb, txt_emb, grad_params, kind)
                )
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
    md = md_table(header, rows)
    print(md)
    if args.no_write:
        return
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


if __name__ == "__main__":
    main()
