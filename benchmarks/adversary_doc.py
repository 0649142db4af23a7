"""Per-scenario-type figures of the adversary change (route follower, expert, policies), before and after.

    # the runs: benchmarks/parity_runs.py on a checkout before the change and on this one
    python benchmarks/adversary_doc.py collect --runs out/adv/before --json docs/results/adversaries/before.json
    python benchmarks/adversary_doc.py collect --runs out/adv/after --json docs/results/adversaries/after.json
    # the tables in docs/benchmark.md (between the adversaries markers), from the two committed files
    python benchmarks/adversary_doc.py doc docs/results/adversaries

``collect`` reads ``<runs>/<driver>/<protocol>/results.json`` (the files ``parity_runs.py`` writes) and keeps
per driver and protocol the headline figures and, per scenario type, the number of routes, DS and SR.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

BEGIN, END = "<!-- adversaries-per-type:begin -->", "<!-- adversaries-per-type:end -->"
NAMED = ("OppositeVehicleRunningRedLight", "OppositeVehicleTakingPriority", "InvadingTurn",
         "NonSignalizedJunctionRightTurn", "InterurbanActorFlow", "NonSignalizedJunctionLeftTurnEnterFlow",
         "EnterActorFlow")
"""The types whose whole point is that a driver who does not yield or brake is hit (the issue names them)."""


def _type_of(record: dict) -> str:
    return re.sub(r"_\d+$", "", record["scenario_name"])


def figures(results: Path) -> dict:
    """Headline figures and per-type {routes, DS, SR} of one ``results.json``."""
    d = json.loads(results.read_text())
    per: dict[str, list] = {}
    for r in d["_checkpoint"]["records"]:
        per.setdefault(_type_of(r), []).append(r)
    types = {}
    for t, rs in sorted(per.items()):
        ok = [r["status"] in ("Completed", "Perfect") for r in rs]
        types[t] = {"routes": len(rs), "DS": round(sum(r["scores"]["score_composed"] for r in rs) / len(rs), 2),
                    "SR": round(100.0 * sum(ok) / len(rs), 1)}
    s = d["summary"] if "summary" in d else {}
    head = {k: round(float(s[k]), 2) for k in ("DS", "SR", "RC", "IS") if k in s}
    return {**head, "types": types}


def collect(runs: Path) -> dict:
    out = {}
    for drv in sorted(p for p in runs.iterdir() if p.is_dir()):
        for proto in ("b2d-star", "b2d"):
            f = drv / proto / "results.json"
            if f.is_file():
                out.setdefault(drv.name, {})[proto] = figures(f)
    if not out:
        raise SystemExit(f"no <driver>/<protocol>/results.json under {runs}")
    return out


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def tables(before: dict, after: dict) -> str:
    """Markdown: headline figures per driver, then per type the route follower and the expert (b2d-star)."""
    lines = ["#### Headline figures on `test` (220 routes, one traffic seed), before / after", "",
             "| driver | protocol | DS before | DS after | SR before | SR after | RC before | RC after |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for drv in (d for d in after if not d.startswith("_")):
        for proto in ("b2d-star", "b2d"):
            a, b = after[drv].get(proto), before.get(drv, {}).get(proto)
            if a is None:
                continue
            g = lambda x, k: f"{x[k]:.2f}" if x and k in x else "-"  # noqa: E731
            lines.append(f"| {drv} | {proto} | {g(b, 'DS')} | {g(a, 'DS')} | {g(b, 'SR')} | {g(a, 'SR')} | "
                         f"{g(b, 'RC')} | {g(a, 'RC')} |")
    lines += ["", "#### Per scenario type, `b2d-star` (DS; SR in brackets), before / after", "",
              "Types marked * are the ones where a driver who does not yield or brake must be hit.", "",
              "| type | route follower before | route follower after | expert before | expert after |",
              "|---|---:|---:|---:|---:|"]
    types = sorted(after["lane-follow"]["b2d-star"]["types"])
    for t in types:
        cells = []
        for drv in ("lane-follow", "expert"):
            for src in (before, after):
                x = src.get(drv, {}).get("b2d-star", {}).get("types", {}).get(t)
                cells.append(f"{x['DS']:.1f} ({x['SR']:.0f})" if x else "-")
        lines.append(f"| {t}{' *' if t in NAMED else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--runs", required=True, type=Path)
    c.add_argument("--json", required=True, type=Path)
    d = sub.add_parser("doc")
    d.add_argument("folder", type=Path, help="holds before.json and after.json")
    d.add_argument("--doc", type=Path, default=Path("docs/benchmark.md"))
    args = ap.parse_args()
    if args.cmd == "collect":
        new = collect(args.runs)
        old = json.loads(args.json.read_text()) if args.json.is_file() else {}
        old.update(new)
        _write(args.json, json.dumps(old, indent=1) + "\n")
        print(f"wrote {args.json} ({', '.join(new)})")
        return
    before = json.loads((args.folder / "before.json").read_text())
    after = json.loads((args.folder / "after.json").read_text())
    text = args.doc.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.doc} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    _write(args.doc, head + BEGIN + "\n\n" + tables(before, after) + "\n" + END + tail)
    print(f"wrote the per-type tables into {args.doc}")


if __name__ == "__main__":
    main()
