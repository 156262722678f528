"""``trakview compare RUN_A RUN_B``: did the fix work? Per validation pair, what changed from one
run to the other, and TRAK's prediction of a removal against what retraining did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from engine.cli.options import Verbose, setup_logging


def compare(
    run_a: Annotated[Path, typer.Argument(help="The run before (its scores make the prediction).")],
    run_b: Annotated[Path, typer.Argument(help="The run after: retrained, built again.")],
    basket: Annotated[
        str | None,
        typer.Option(
            help="Run A's basket whose removal made B's training set (default: A's training "
            "pairs missing from B's)."
        ),
    ] = None,
    column: Annotated[
        list[str] | None,
        typer.Option(help="A group: the validation pairs whose field KEY equals VALUE (repeat)."),
    ] = None,
    search: Annotated[
        list[str] | None,
        typer.Option(help="A group: the validation pairs whose caption or id contains a text."),
    ] = None,
    top: Annotated[
        int, typer.Option(help="Groups of the N pairs the removal was predicted to move most.")
    ] = 20,
    k: Annotated[int, typer.Option("-k", help="Pairs listed as improved and regressed.")] = 10,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples of the intervals.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    out: Annotated[
        Path | None, typer.Option(help="Also write a self-contained HTML report to this file.")
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Compare two runs of the same validation pairs: margins, caption ranks and retrieval per
    pair and per group, and TRAK's predicted effect of the removal against the actual change."""
    from engine import files
    from engine.evaluate import compare_report
    from engine.evaluate.compare import CompareConfig, compare_runs

    setup_logging(verbose)
    cfg = CompareConfig(
        basket=basket,
        columns=list(column or []),
        searches=list(search or []),
        top=top,
        k=k,
        bootstrap=bootstrap,
        seed=seed,
    )
    comparison = compare_runs(run_a, run_b, cfg)
    doc = compare_report.to_json(comparison)
    if out is not None:
        listed = [p["id"] for p in doc["improved"] + doc["regressed"]]
        page = compare_report.html_report(doc, compare_report.thumbnails(comparison, listed))
        out.parent.mkdir(parents=True, exist_ok=True)
        files.write_text(out, page)
    if json_out:
        typer.echo(json.dumps(doc, indent=2))
        return
    typer.echo(comparison_text(doc))
    if out is not None:
        typer.echo(f"report: {out}")


def _ci(value: dict[str, Any], key: str = "mean", digits: int = 3) -> str:
    lo, hi = value["ci"]
    return f"{value[key]:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def comparison_text(doc: dict[str, Any]) -> str:
    """The comparison as a few lines of text."""
    runs, val, train = doc["runs"], doc["val"], doc["train"]
    lines = [
        f"A  {runs['a']['run']}: {runs['a']['n_train']} training pairs, "
        f"{runs['a']['checkpoints']} checkpoints",
        f"B  {runs['b']['run']}: {runs['b']['n_train']} training pairs, "
        f"{runs['b']['checkpoints']} checkpoints",
        f"validation pairs: {val['matched']} matched by id, {val['only_a']} only in A, "
        f"{val['only_b']} only in B",
        f"training pairs: {train['removed']} of A's not in B, {train['added']} of B's not in A",
        "",
        f"{'pairs':<40} {'n':>5}  {'margin change [95%]':<26} {'up':>4} {'down':>4}  "
        f"{'rank A->B':<11} {'i2t R@1 A->B':<12} predicted",
    ]
    for name, s in {"all matched pairs": doc["overall"], **doc["groups"]}.items():
        if not s["n"]:
            lines.append(f"{name[:40]:<40} {0:>5}")
            continue
        r1 = s["retrieval"]["i2t_r1"]
        rank = s["caption_rank"]
        predicted = s["predicted_change"]
        lines.append(
            f"{name[:40]:<40} {s['n']:>5}  {_ci(s['margin_change']):<26} "
            f"{s['improved']:>4.0%} {s['regressed']:>4.0%}  "
            f"{rank['median_a']:>4g} -> {rank['median_b']:<4g} {r1['a']:.2f} -> {r1['b']:.2f} "
            + ("" if predicted is None else f"{predicted:+.4f}")
        )
    check, basket = doc["prediction"], doc["basket"]
    if check:
        lines += ["", f"TRAK's prediction of removing {basket['name']} ({basket['pairs']} pairs):"]
        for name, label in (("actual", "own margins"), ("fixed", "at a fixed contrast batch")):
            if name in check:
                a, e = check[name], check[name]["explained"]
                lines.append(
                    f"  {label}: Pearson {_ci(a['pearson'], 'value', 2)}, Spearman "
                    f"{_ci(a['spearman'], 'value', 2)}, sign agreement "
                    f"{_ci(a['sign'], 'value', 2)} (chance {a['sign']['chance']:.2f}); R^2 fit "
                    f"{e['fit']:.3f}, scaled {e['scaled']:.3f} (x{e['scale']:.2f}), as predicted "
                    f"{e['as_predicted']:.3f}; mean predicted {a['mean_predicted']:+.4f}, actual "
                    f"{a['mean_actual']:+.4f}"
                )
    for title, key in (("improved most", "improved"), ("regressed most", "regressed")):
        lines += ["", f"{title}:"]
        for p in doc[key]:
            predicted = "" if p["predicted"] is None else f" (predicted {p['predicted']:+.3f})"
            lines.append(
                f"  {p['change']:+.3f}{predicted}  rank {p['rank_a']} -> {p['rank_b']}  "
                f"{p['id']}  {p['caption']}"
            )
    lines += ["", *(f"note: {n}" for n in doc["notes"])]
    return "\n".join(lines).rstrip()
