"""Human-readable reports of a benchmark summary: a Markdown table, an ability bar chart, a per-type table."""

from __future__ import annotations


from craft.bench.metrics import ABILITY_KEYS, INFRACTION_KEYS, is_success
from craft.files import atomic_write

__all__ = ["summary_markdown", "ability_bar_chart", "per_type_table"]


def _fmt(x, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def per_type_table(records: list[dict]) -> dict[str, dict]:
    """Scenario type -> ``{"routes": n, "success": successful routes (count), "DS": mean DS}`` over the
    given records (crashed ones count as failed with DS 0), types sorted by name."""
    table: dict[str, dict] = {}
    for r in records:
        row = table.setdefault(r["scenario_type"], {"routes": 0, "success": 0, "DS": 0.0})
        row["routes"] += 1
        row["success"] += int(is_success(r))
        row["DS"] += float(r["scores"]["score_composed"])
    for row in table.values():
        row["DS"] /= row["routes"]
    return dict(sorted(table.items()))


def summary_markdown(summary: dict, per_type: dict | None = None) -> str:
    """The summary a user reads: headline metrics, abilities, infractions per km and, optionally, the
    per-scenario-type table of :func:`per_type_table`."""
    s = summary
    seeds = ", ".join(str(x) for x in s.get("town_seeds", [])) or "-"
    lines = [
        f"# Benchmark: {s.get('policy') or 'policy'} on {s.get('split') or 'split'} ({s.get('protocol')})",
        "",
        f"{s.get('num_routes')} routes, town seeds {seeds}.",
        "",
        "| DS | SR (%) | RC | IS | Efficiency | Comfortness |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {_fmt(s.get('DS'))} | {_fmt(s.get('SR'))} | {_fmt(s.get('RC'))} | {_fmt(s.get('IS'), 3)} | "
        f"{_fmt(s.get('efficiency'))} | {_fmt(s.get('comfort'))} |",
        "",
        "## Abilities (success rate, %)",
        "",
        "| " + " | ".join(ABILITY_KEYS) + " |",
        "|" + "---:|" * len(ABILITY_KEYS),
        "| " + " | ".join(_fmt(s.get("abilities", {}).get(k)) for k in ABILITY_KEYS) + " |",
        "",
        "## Infractions per km",
        "",
        "| infraction | per km |",
        "|---|---:|",
    ]
    per_km = s.get("infractions_per_km", {})
    for key in INFRACTION_KEYS:
        if key in per_km:
            label = key + (" (km driven outside)" if key == "outside_route_lanes" else "")
            lines.append(f"| {label} | {_fmt(per_km[key], 3)} |")
    if per_type:
        lines += ["", "## Per scenario type", "", "| scenario type | routes | success | SR (%) | DS |",
                  "|---|---:|---:|---:|---:|"]
        for name, row in per_type.items():
            sr = 100.0 * row["success"] / row["routes"] if row["routes"] else None
            lines.append(f"| {name} | {row['routes']} | {row['success']} | {_fmt(sr, 1)} | {_fmt(row['DS'])} |")
    return "\n".join(lines) + "\n"


def ability_bar_chart(summary: dict, path: str) -> str:
    """Bar chart of the ability success rates (and their mean) as a PNG at ``path`` (written atomically:
    a temporary file in the same folder, then ``os.replace``). Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ab = summary.get("abilities", {})
    names = list(ABILITY_KEYS)
    values = [ab.get(k) if ab.get(k) is not None else 0.0 for k in names]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    try:
        bars = ax.bar(names, values, color=["#4c72b0"] * (len(names) - 1) + ["#dd8452"])
        for bar, k in zip(bars, names):
            label = "n/a" if ab.get(k) is None else f"{ab[k]:.1f}"
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1, label, ha="center", fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_ylabel("success rate (%)")
        ax.set_title(f"{summary.get('policy') or 'policy'}: DS {_fmt(summary.get('DS'))}, "
                     f"SR {_fmt(summary.get('SR'))} ({summary.get('protocol')})")
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)
    return path
