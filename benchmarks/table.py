"""``python -m benchmarks.table RESULT.json``: the run as a Markdown table (for the README)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _labels(results: list[dict[str, Any]]) -> list[str]:
    """Column names: the store kind, with the URL's options where two runs
    share a kind (``sqlite`` and ``sqlite (commit=inline)``)."""
    kinds = [r["target"] for r in results]
    labels = []
    for r in results:
        query = r.get("url", "").partition("?")[2]
        labels.append(
            f"{r['target']} ({query})" if kinds.count(r["target"]) > 1 and query else r["target"]
        )
    return labels


def render(doc: dict[str, Any]) -> str:
    targets = _labels(doc["results"])
    by_key: dict[str, dict[str, dict[str, Any]]] = {}
    names: dict[str, str] = {}
    # Key order from the store with the most figures (memory lacks the baselines).
    ranked = sorted(
        zip(targets, doc["results"], strict=True), key=lambda tr: -len(tr[1]["figures"])
    )
    for label, r in ranked:
        for f in r["figures"]:
            by_key.setdefault(f["key"], {})[label] = f
            names.setdefault(f["key"], f["unit"])
    lines = [
        "| figure | unit | " + " | ".join(targets) + " |",
        "|---|---|" + "---|" * len(targets),
    ]
    for key, per in by_key.items():
        cells = []
        for t in targets:
            f = per.get(t)
            if f is None:
                cells.append("-")
                continue
            cell = f"{_num(f['median'])} [{_num(f['min'])} .. {_num(f['max'])}]"
            if "ratio" in f:
                cell += f" **{f['ratio']:.2f}x** {f['baseline']}"
            if "meets" in f:
                cell += " ok" if f["meets"] else " MISS"
            cells.append(cell)
        lines.append(f"| `{key}` | {names[key]} | " + " | ".join(cells) + " |")
    skipped = [(t, s) for t, r in zip(targets, doc["results"], strict=True) for s in r["skipped"]]
    if skipped:
        lines.append("")
        lines.append("Not measured:")
        lines.append("")
        lines += [f"- {t} `{s['key']}`: {s['reason']}" for t, s in skipped]
    return "\n".join(lines)


def main() -> None:
    doc = json.loads(Path(sys.argv[1]).read_text())
    print(f"Command: `{doc['command']}` ({doc['started']}, {doc['machine']['cpu']}, "
          f"{doc['machine']['cpus']} CPUs, Python {doc['machine']['python']})\n")  # fmt: skip
    print(render(doc))


if __name__ == "__main__":
    main()
