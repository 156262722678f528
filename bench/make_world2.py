"""The second benchmark world, written as a user's data: not the demo's layout and not its kind of
failure. Another seed (7), size (4000 training, 400 validation pairs) and planted failure
(``swapped``: a labeller swaps "blue" and "purple" in 60% of their training captions), written
as open_clip_train CSVs (tab-separated ``filepath`` / ``title``, absolute image paths, extra
columns ``source``, ``shape``, ``colour`` and the ground truth ``planted_failure``) under
``OUT/images/{train,val}/`` and ``OUT/{train,val}.csv``. What is then done with it is a user's
command line (BENCHMARKS.md, `bench_failure_world2`):

    python bench/make_world2.py --out /data/world2
    trakview train --train-data /data/world2/train.csv --out /data/world2/ft --init BASE.pt \\
        --lr 1e-3 --warmup-steps 10 --save-epochs 5,10
    trakview build --train-data /data/world2/train.csv --val-data /data/world2/val.csv \\
        --checkpoints-dir /data/world2/ft --epochs all --out /data/world2/run
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from engine import files
from engine.data import synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-val", type=int, default=400)
    args = parser.parse_args()
    out = args.out.resolve()
    world = synthetic.generate_world(
        synthetic.WorldConfig(
            n_train=args.n_train,
            n_val=args.n_val,
            seed=args.seed,
            failure="swapped",
            failure_fraction=0.6,
        )
    )
    for split, records, images in (
        ("train", world.train, world.train_images),
        ("val", world.val, world.val_images),
    ):
        rows = []
        for rec, pixels in zip(records, images, strict=True):
            path = out / "images" / split / f"{rec['id']}.png"
            files.save_png(path, pixels)
            rows.append(
                [
                    path,
                    rec["caption"],
                    rec["source"],
                    rec["shape"],
                    rec["colour"],
                    str(rec["planted_failure"]).lower(),
                ]
            )
        with open(out / f"{split}.csv", "w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t")
            writer.writerow(["filepath", "title", "source", "shape", "colour", "planted_failure"])
            writer.writerows(rows)
    cause = sum(r["planted_failure"] for r in world.train)
    victims = sum(r["planted_failure"] for r in world.val)
    print(
        f"{out}: {len(world.train)} training pairs ({cause} planted cause), {len(world.val)} validation ({victims} victims)"
    )


if __name__ == "__main__":
    main()
