"""How long a command takes end to end, this checkout against another one, side by side.

Each command runs as a new process (what a user waits for): ``trakview --help``, ``trakview info
RUN``, and one ``trakview query RUN --image IMG --caption TEXT`` (checkpoints loaded, one new
query). The two versions alternate in every repeat so that the machine's state is shared.

    python bench/bench_start.py demo-run/run --before /tmp/trakview-before   # a clone at an
                                                                             # earlier commit
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench_common import ROOT, arguments, machine, md_table, spread, write_section
from engine import files
from engine.run.layout import RunLayout


def _command(source: Path, args: list[str]) -> list[str]:
    """``trakview ARGS`` run from the checkout at ``source`` (its engine before any other)."""
    code = f"import sys; sys.path.insert(0, {str(source)!r}); from engine.cli import main; main()"
    return [sys.executable, "-c", code, *args]


def _seconds(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed: {done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("run", type=Path, help="a finished run (the demo's)")
    parser.add_argument("--before", type=Path, help="a checkout of the version to compare with")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    val = files.read_jsonl(RunLayout(args.run).pairs("val"))[0]
    image = str((args.run / val["image"]).resolve())
    commands = {
        "trakview --help": ["--help"],
        "trakview info RUN": ["info", str(args.run)],
        "trakview query RUN (one-off)": ["query", str(args.run), "--image", image]
        + ["--caption", val["caption"], "-k", "5"],
    }
    versions = {"this checkout": ROOT}
    if args.before:
        versions["before"] = args.before.resolve()
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            for version, source in versions.items():
                times.setdefault((name, version), []).append(_seconds(_command(source, cmd)))
    rows = []
    for name in commands:
        now = spread(times[(name, "this checkout")], digits=2)
        row = [name, *now]
        if args.before:
            before = spread(times[(name, "before")], digits=2)
            row += [*before, f"{float(before[0]) / float(now[0]):.1f}x"]
        rows.append(row)
    header = ["command", "median s", "range s"]
    if args.before:
        header += ["before: median s", "before: range s", "faster"]
    table = md_table(header, rows)
    print(table)
    if not args.no_write:
        write_section(
            "bench_start",
            "### Starting a command (`bench_start`)\n\n"
            f"Each command as a new process, median of {args.repeats}, the two versions "
            f"alternating. {machine()}. Targets: `--help` < 0.5 s, `info` < 1.5 s, a one-off "
            f"query < 3 s.\n\n{table}\n",
        )


if __name__ == "__main__":
    main()
