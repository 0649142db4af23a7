"""Markdown table of closed-loop results (DS, SR, abilities) from evaluation folders.

    python benchmarks/policy_table.py NAME=DIR [NAME=DIR ...]

Each DIR is a `craft eval --out` folder (its results.json is read).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ABILITIES = ("Merging", "Overtaking", "Emergency_Brake", "Give_Way", "Traffic_Signs", "Mean")


def row(name: str, d: Path) -> str:
    s = json.loads((d / "results.json").read_text())["summary"]
    ab = s["abilities"]
    cells = [f"{s['DS']:.2f}", f"{s['SR']:.2f}", f"{s['RC']:.2f}", f"{s['IS']:.3f}"]
    cells += ["–" if ab[a] is None else f"{ab[a]:.1f}" for a in ABILITIES]
    return f"| {name} | {s['protocol']} | " + " | ".join(cells) + " |"


def main(argv: list[str]) -> None:
    print("| policy | protocol | DS | SR | RC | IS | " + " | ".join(ABILITIES) + " |")
    print("|---|---|" + "---:|" * (4 + len(ABILITIES)))
    for arg in argv:
        name, _, d = arg.partition("=")
        print(row(name, Path(d)))


if __name__ == "__main__":
    main(sys.argv[1:])
