"""Write the Bench2Drive-parity measurements into docs/benchmark.md (between its parity markers).

    python benchmarks/parity_doc.py docs/results/parity

Reads ``before.json`` / ``after.json`` / ``no_switches.json`` (``benchmarks/parity_runs.py`` summaries) and
``route_distribution_{before,after}.json`` (``benchmarks/route_distribution.py``) from the folder.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

BEGIN, END = "<!-- parity-measurements:begin -->", "<!-- parity-measurements:end -->"
ROWS = (("expert", "expert"), ("lane-follow", "lane-follow"), ("vocab", "vocab.pt"), ("hier", "hier.pt"),
        ("vla", "vla.pt"))


def f(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def headline(before: dict, after: dict) -> list[str]:
    lines = ["| driver | protocol | DS before | DS after | SR before | SR after | RC before | RC after | "
             "IS before | IS after | Efficiency before | after | Comfort before (rad/s rule) | after (Bench2Drive) | "
             "comfort_si after | wall s before / after |", "|---|---|" + "---:|" * 14]
    for key, name in ROWS:
        if key not in after:
            continue
        b, a = before.get(key, {}), after[key]
        for p in ("b2d", "b2d-star"):
            bb, aa = b.get(p, {}), a[p]
            lines.append(f"| {name} | {p} | {f(bb.get('DS'))} | {f(aa['DS'])} | {f(bb.get('SR'))} | {f(aa['SR'])} | "
                         f"{f(bb.get('RC'))} | {f(aa['RC'])} | {f(bb.get('IS'), 3)} | {f(aa['IS'], 3)} | "
                         f"{f(bb.get('efficiency'), 1)} | {f(aa['efficiency'], 1)} | {f(bb.get('comfort'), 1)} | "
                         f"{f(aa['comfort'], 1)} | {f(aa.get('comfort_si'), 1)} | "
                         f"{f(b.get('wall_s'), 0)} / {f(a.get('wall_s'), 0)} |")
    return lines


def abilities(before: dict, after: dict) -> list[str]:
    keys = ("Merging", "Overtaking", "Emergency_Brake", "Give_Way", "Traffic_Signs", "Mean")
    lines = ["| driver | protocol | " + " | ".join(f"{k} before / after" for k in keys) + " |",
             "|---|---|" + "---:|" * len(keys)]
    for key, name in ROWS:
        if key not in after:
            continue
        for p in ("b2d", "b2d-star"):
            ab = before.get(key, {}).get(p, {}).get("abilities") or {}
            aa = after[key][p]["abilities"]
            lines.append(f"| {name} | {p} | " + " | ".join(f"{f(ab.get(k), 1)} / {f(aa.get(k), 1)}" for k in keys)
                         + " |")
    return lines


def attribution(before: dict, after: dict, nosw: dict) -> list[str]:
    """Rule by rule on the expert and the vocab policy: before; seeding + placement (new rollout without the
    scenario switches, scored with the earlier metrics); + the two switches (the full new rollout, earlier
    metrics); + the metric rules (the full new rollout, new metrics)."""
    lines = ["| driver | protocol | figure | before | + per-route seeding, placement | + wrong-direction exemption, "
             "blocked suspension | + efficiency, comfort, outside-lanes, tick-cap rules (after) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for key, name in (("expert", "expert"), ("vocab", "vocab.pt")):
        if key not in after or key not in nosw:
            continue
        for p in ("b2d", "b2d-star"):
            stages = [before.get(key, {}).get(p, {}), nosw[key]["old_metrics"][p], after[key]["old_metrics"][p],
                      after[key][p]]
            for fig, nd in (("DS", 2), ("SR", 2), ("RC", 2), ("IS", 3), ("efficiency", 1), ("comfort", 1)):
                lines.append(f"| {name} | {p} | {fig} | " + " | ".join(f(s.get(fig), nd) for s in stages) + " |")
    return lines


def distribution(dist_before: dict, dist_after: dict) -> list[str]:
    fmt = lambda d: f"{d['p10']:.0f} / {d['p50']:.0f} / {d['p90']:.0f} ({d['min']:.0f}-{d['max']:.0f})"  # noqa: E731
    names = {"route_length": "route length", "trigger": "start -> trigger (activation)",
             "after_trigger": "route after the trigger", "first_reaction": "start -> first scripted reaction",
             "interaction": "start -> interaction", "after_interaction": "route after the interaction",
             "interaction (distance types)": "start -> interaction, the 13 distance types",
             "after_interaction (distance types)": "route after the interaction, the 13 distance types"}
    lines = ["| route metres (10 % / median / 90 % (min-max)) | Bench2Drive 220 | ours before | ours after |",
             "|---|---|---|---|"]
    for k, label in names.items():
        b = dist_after["bench2drive220"].get(k)
        lines.append(f"| {label} | {fmt(b) if b else '-'} | {fmt(dist_before['ours'][k])} | "
                     f"{fmt(dist_after['ours'][k])} |")
    return lines


def main(folder: str, doc: str = "docs/benchmark.md") -> None:
    d = Path(folder)
    load = lambda n: json.loads((d / n).read_text()) if (d / n).exists() else {}  # noqa: E731
    before, after, nosw = load("before.json"), load("after.json"), load("no_switches.json")
    db, da = load("route_distribution_before.json"), load("route_distribution_after.json")
    block = [BEGIN, "", "#### Headline figures on `test` (220 routes), before and after", ""] + headline(before, after)
    block += ["", "#### Abilities (success %), before / after", ""] + abilities(before, after)
    block += ["", "#### Which rule moved which figure (expert and the vocab policy)", "",
              "Columns left to right add one group of changes: `before` is the earlier code; the second column is a "
              "rollout of the new code with both scenario switches off, scored with the earlier metric rules "
              "(so it shows per-route seeding and the new placement); the third is the full new rollout scored "
              "with the earlier metric rules (adds the two switches); the last is the same rollout with the "
              "new metric rules (what `craft eval` reports now). Comfort under the earlier rules is the rad/s "
              "variant (now `comfort_si`).", ""] + attribution(before, after, nosw)
    if db and da:
        block += ["", "#### Where the scenario sits on the route (`test` split vs Bench2Drive's 220 routes)", ""]
        block += distribution(db, da)
    block += ["", END]
    text = Path(doc).read_text()
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + "\n".join(block) + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + "\n".join(block) + "\n"
    tmp = Path(doc).with_name(f".{Path(doc).name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, doc)
    print(f"wrote {doc}")


if __name__ == "__main__":
    main(*sys.argv[1:])
