"""Which signal finds the demo world's planted mislabeled pairs, and the run's trust verdict.

Reads a finished run (the default demo's) and prints the ROC AUC of every suspected-mislabeled
signal (``engine.attribution.suspects``) on the planted ground truth, with a bootstrap interval
of each signal's difference to the shipped one (resampling training pairs), and the verdict
``trakview info`` prints.

    python bench/bench_suspects.py demo-run/run
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench_common import arguments, md_table, write_section
from engine import files
from engine.attribution.suspects import SHIPPED
from engine.evaluate.groundtruth import roc_auc
from engine.explore.run_data import RunData


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    run = RunData(args.run)
    labels = np.array([bool(r.get("mislabeled")) for r in run.train])
    signals = run.suspect_signals()
    shipped = files.load_npy(run.layout.suspect)
    assert np.allclose(shipped, signals[SHIPPED], rtol=1e-6), "the run ships another ranking"
    rng = np.random.default_rng(0)
    resamples = [rng.integers(0, len(labels), len(labels)) for _ in range(args.bootstrap)]
    rows = []
    for name, values in signals.items():
        auc = roc_auc(values, labels)
        diffs = sorted(
            roc_auc(signals[SHIPPED][r], labels[r]) - roc_auc(values[r], labels[r])
            for r in resamples
        )
        low, high = diffs[int(0.025 * len(diffs))], diffs[int(0.975 * len(diffs)) - 1]
        versus = "" if name == SHIPPED else f"{auc - roc_auc(signals[SHIPPED], labels):+.3f}"
        interval = "" if name == SHIPPED else f"[{-high:+.3f}, {-low:+.3f}]"
        rows.append(
            (name + (" (shipped)" if name == SHIPPED else ""), f"{auc:.3f}", versus, interval)
        )
    table = md_table(("signal", "ROC AUC", "minus shipped", "95% interval"), rows)
    verdict = run.verdict()
    said = f"Trust verdict of this run: **{verdict.level}** ({verdict.reason}).\n\n" + "\n".join(
        f"- {line}" for line in verdict.evidence
    )
    print(table, "\n", said)
    if not args.no_write:
        write_section(
            "bench_suspects",
            "### Suspected mislabeled pairs: which signal finds them, and the trust verdict\n\n"
            f"Run `{args.run}`: {int(labels.sum())} planted mislabeled of {len(labels)} training "
            f"pairs; intervals: bootstrap over training pairs ({args.bootstrap} resamples). "
            f"`python bench/bench_suspects.py RUN`.\n\n{table}\n\n{said}\n",
        )


if __name__ == "__main__":
    main()
