"""A basket's predicted effect and its verification by retraining, as text."""

from __future__ import annotations

from typing import Any


def effect_text(doc: dict[str, Any]) -> str:
    """The predicted effect as a few lines of text."""
    held = doc["held_out"]
    lines = [
        f"basket {doc['basket']}: {doc['pairs']} training pairs",
        f"predicted change of the mean validation margin: {doc['predicted_mean_change']:+.4f} "
        f"({doc['mean_margin']:.4f} -> {doc['predicted_mean_margin']:.4f}) over {doc['n_val']} "
        f"pairs; {doc['share_helped']:.0%} rise, {doc['share_hurt']:.0%} fall",
    ]
    if held["n_val"] < doc["n_val"]:
        change = held["predicted_mean_change"]
        lines.append(
            f"on the {held['n_val']} validation pairs not used to choose it: "
            + (f"{change:+.4f}" if change is not None else "none")
        )
    for title, key in (("most helped", "most_helped"), ("most hurt", "most_hurt")):
        lines.append(f"{title}:")
        lines += [f"  {p['delta']:+.4f}  {p['id']}  {p['caption']}" for p in doc[key]]
    lines.append(f"caveat: {doc['caveat']}")
    return "\n".join(lines)


def verification_text(result: dict[str, Any]) -> str:
    """A basket's verification (``trakview eval clean``) as text: per condition the measured
    mean of every metric and its change against ``full``, with intervals."""
    m = result["measured"]
    lines = [
        f"basket {result['basket']}: {result['pairs']} pairs; {len(result['seeds'])} models per "
        f"condition; {m['n_val']} validation pairs measured "
        f"({'held out' if m['held_out'] else 'NOT held out: optimistic'})",
    ]
    sets = result.get("sets") or {"measured": {"conditions": result["conditions"]}}
    group = result.get("group")
    for set_name, part in sets.items():
        if group:
            lines += ["", f"{set_name}: {part['n_val']} pairs, {group['sets'][set_name]}"]
        lines += _condition_table(result["metrics"], part["conditions"])
    lines += ["", "(value, then the change against full with its interval)", result["summary"]]
    lines += [f"note: {note}" for note in result.get("notes", [])]
    predicted = result["conditions"]["basket"]["predicted_margin_change"]
    lines.append(f"TRAK predicted a mean margin change of {predicted:+.4f} for the basket")
    return "\n".join(lines)


def _condition_table(metrics: dict[str, str], conditions: dict[str, Any]) -> list[str]:
    lines = ["", "condition   " + "  ".join(f"{k:<30}" for k in metrics)]
    for name, cond in conditions.items():
        cells = []
        for metric, value in cond["metrics"].items():
            diff = cond.get("minus_full", {}).get(metric)
            cells.append(
                f"{value['mean']:+.3f}"
                + (
                    f" {diff['mean']:+.3f} [{diff['ci'][0]:+.3f},{diff['ci'][1]:+.3f}]"
                    if diff
                    else ""
                )
            )
        lines.append(f"{name:<11} " + "  ".join(f"{c:<30}" for c in cells))
    return lines


def group_effect_text(doc: dict[str, Any]) -> str:
    def line(title: str, part: dict[str, Any]) -> str:
        share = part["share"]
        return (
            f"  {title}: {part['pairs']} pairs, margin deficit {part['deficit']:.4f}, predicted "
            f"change {part['predicted_change']:+.4f}"
            + (f" ({share:.0%} of the deficit)" if share is not None else "")
        )

    lines = [f"group {doc['group']}:", line("whole group", doc["whole"])]
    if "held_out" in doc:
        lines.append(line("held-out half", doc["held_out"]))
    lines.append(line("a random basket of as many pairs", doc["random_basket"]))
    return "\n".join(lines)
