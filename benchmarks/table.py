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


def render(doc: dict[str, Any]) -> str:
    targets = [r["target"] for r in doc["results"]]
    by_key: dict[str, dict[str, dict[str, Any]]] = {}
    names: dict[str, str] = {}
    # Key order from the store with the most figures (memory lacks the baselines).
    for r in sorted(doc["results"], key=lambda r: -len(r["figures"])):
        for f in r["figures"]:
            by_key.setdefault(f["key"], {})[r["target"]] = f
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
    skipped = [(r["target"], s) for r in doc["results"] for s in r["skipped"]]
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
