"""The benchmark's report: a table of medians and ratios, growth, targets, JSON and a chart."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

Results = dict[str, dict[int, dict[str, list[float]]]]

# (task, N, numerator, denominator, limit): ratio targets from the benchmark issue
RATIO_TARGETS = [
    ("migrate sqlite", 200, "ours", "alembic", 0.6),
    ("migrate postgres", 200, "ours", "alembic", 1.0),
    ("migrate postgres", 200, "ours", "floor", 1.5),
    ("status", 200, "ours", "alembic", 1.2),
]
IMPORTS = "python imports"  # the start-up no Alembic-based tool avoids; a reference, not a task
GROWTH_LIMIT = 5.5
LIST_LIMIT = 0.15
CHECKSUM_LIMIT_MS = 50.0


def median(times: list[float]) -> float:
    return statistics.median(times)


def cell(times: list[float] | None) -> str:
    if not times:
        return "-"
    return f"{median(times):.3f} ({min(times):.3f}-{max(times):.3f})"


def ratio(row: dict[str, list[float]], top: str, bottom: str) -> float | None:
    if not row.get(top) or not row.get(bottom):
        return None
    return median(row[top]) / median(row[bottom])


def table(results: Results, checksum_ms: float, checksum_n: int, machine: str) -> str:
    lines = [
        f"Measured on {machine}; seconds, median (min-max) of the rounds.",
        "",
        "| task | N | ours | plain Alembic | raw SQL floor | ours / Alembic | ours / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, sizes in results.items():
        if task == IMPORTS:
            continue
        for size, row in sorted(sizes.items()):
            vs_alembic, vs_floor = ratio(row, "ours", "alembic"), ratio(row, "ours", "floor")
            lines.append(
                f"| {task} | {size} | {cell(row.get('ours'))} | {cell(row.get('alembic'))} | "
                f"{cell(row.get('floor'))} | {fmt(vs_alembic)} | {fmt(vs_floor)} |"
            )
    lines += ["", "What no Alembic-based tool on asyncpg can avoid:", ""]
    lines += [f"- {line}" for line in lower_bounds(results)]
    lines += ["", "Growth, time(N=1000) / time(N=200):", ""]
    lines += [f"- {task}, {tool}: {fmt(value)}" for task, tool, value in growth(results)]
    lines += ["", "Targets:", ""]
    lines += [f"- {verdict}" for verdict in targets(results, checksum_ms, checksum_n)]
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def lower_bounds(results: Results) -> list[str]:
    """Python's imports plus the server's own work (the floor), as a ratio to the floor."""
    lines = []
    for size, row in sorted(results.get("migrate postgres", {}).items()):
        imports = results.get(IMPORTS, {}).get(size, {}).get("python")
        if imports and row.get("floor"):
            start, floor = median(imports), median(row["floor"])
            lines.append(
                f"N={size}: importing alembic, sqlalchemy.ext.asyncio and asyncpg takes "
                f"{start:.3f} s; with the floor's {floor:.3f} s that is "
                f"{(start + floor) / floor:.2f}x the floor before any revision runs in Python"
            )
    return lines


def growth(results: Results) -> list[tuple[str, str, float]]:
    found = []
    for task, sizes in results.items():
        if task != IMPORTS and 200 in sizes and 1000 in sizes:
            for tool in sizes[1000]:
                if sizes[200].get(tool):
                    found.append((task, tool, median(sizes[1000][tool]) / median(sizes[200][tool])))
    return found


def targets(results: Results, checksum_ms: float, checksum_n: int) -> list[str]:
    verdicts = []
    for task, size, top, bottom, limit in RATIO_TARGETS:
        value = ratio(results.get(task, {}).get(size, {}), top, bottom)
        if value is not None:
            verdicts.append(judge(f"{task}, N={size}: {top} / {bottom}", value, limit))
    listing = results.get("invoke --list", {})
    if listing:
        fastest = min(median(row["ours"]) for row in listing.values())
        verdicts.append(judge("invoke --list, seconds", fastest, LIST_LIMIT))
    for task, tool, value in growth(results):
        if tool == "ours":
            verdicts.append(judge(f"growth of {task}", value, GROWTH_LIMIT))
    verdicts.append(
        judge(f"checksum validation of {checksum_n} revisions, ms", checksum_ms, CHECKSUM_LIMIT_MS)
    )
    return verdicts


def judge(label: str, value: float, limit: float) -> str:
    return f"{'met   ' if value <= limit else 'MISSED'} {label}: {value:.2f} (target <= {limit})"


def write_json(path: Path, results: Results, checksum_ms: float, machine: str) -> None:
    data: dict[str, Any] = {"machine": machine, "checksum_validation_ms": checksum_ms}
    data["timings"] = {
        task: {str(n): row for n, row in sizes.items()} for task, sizes in results.items()
    }
    path.write_text(json.dumps(data, indent=2))


def write_png(path: Path, results: Results) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: pip install matplotlib (the bench extra) to draw one"
    tasks = [task for task, sizes in results.items() if len(sizes) > 1 and task != IMPORTS]
    figure, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.5), squeeze=False)
    for axis, task in zip(axes[0], tasks, strict=True):
        sizes = sorted(results[task])
        for tool in ("ours", "alembic", "floor"):
            points = [
                (n, median(results[task][n][tool])) for n in sizes if results[task][n].get(tool)
            ]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=tool)
        axis.set(title=task, xlabel="revisions (N)", ylabel="seconds")
        axis.set_ylim(bottom=0)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return f"wrote {path}"
