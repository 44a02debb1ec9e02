"""The robustness results as Markdown: the matrix of verdicts and the part-B tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _md_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["(none)"]
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [str(r.get(k, "")).replace("|", "\\|").replace("\n", " ") for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_markdown(doc: dict[str, Any]) -> str:
    """The Markdown report of :func:`main`'s JSON document."""
    cases = {c["name"]: c for c in doc["cases"]}
    verdicts = doc["verdicts"]
    lines = [
        "# Robustness: bad inputs, untrusted checkpoints, kills, memory",
        "",
        f"Command: `{doc['command']}`  ",
        f"Date: {doc['date']}; machine: {doc['machine']}; {doc['seconds']:.0f} s in all  ",
        f"Checkpoint: `{doc['checkpoint']}` (config.json sha256 `{doc['checkpoint_sha256'][:16]}`)"
        f"; embed encoder: `{doc['embed_encoder']}`",
        "",
        "Every bad input is made at run time from a real file of `../shared/data/volumes` "
        "(`omnienc.benchmarks.robustness.badinputs`) and handed to each public entry point. "
        "*error*: the "
        "documented omnienc error naming the file and the problem (the CLI: one "
        "`omnienc: error:` line, non-zero exit, no traceback); *skip*: the file is skipped "
        "with a warning naming it and the run goes on; *ok*: accepted; ✗ marks an outcome "
        "other than the expected one.",
        "",
        f"**{sum(int(v['passed']) for v in verdicts)} of {len(verdicts)} entry-point checks as "
        f"expected; {sum(v['observed'] == 'crash' for v in verdicts)} crashes (a traceback or a "
        "non-omnienc exception).**",
        "",
        "## Bad inputs by kind",
        "",
    ]
    kinds: dict[str, dict[str, int]] = {}
    for c in doc["cases"]:
        k = kinds.setdefault(c["kind"], {"cases": 0, "checks": 0, "passed": 0})
        k["cases"] += 1
    for v in verdicts:
        kinds[v["kind"]]["checks"] += 1
        kinds[v["kind"]]["passed"] += int(v["passed"])
    rows = [
        {
            "kind": k,
            "inputs": n["cases"],
            "entry-point checks": n["checks"],
            "as expected": n["passed"],
        }
        for k, n in kinds.items()
    ]
    total = {
        "kind": "**all**",
        "inputs": sum(n["cases"] for n in kinds.values()),
        "entry-point checks": len(verdicts),
        "as expected": sum(int(v["passed"]) for v in verdicts),
    }
    lines += _md_table([*rows, total])
    lines += ["", "## Outcome of each input at each entry point", ""]
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for v in verdicts:
        by_case.setdefault(v["case"], {})[v["entry"]] = v
    table = []
    for name, c in cases.items():
        row: dict[str, Any] = {"kind": c["kind"], "input": f"`{name}`"}
        for e in doc["entries"]:
            v = by_case.get(name, {}).get(e)
            row[e] = "n/a" if v is None else v["observed"] + ("" if v["passed"] else " ✗")
        row["made from"] = c["note"] or c["source"]
        table.append(row)
    lines += _md_table(table)
    failures = [v for v in verdicts if not v["passed"]]
    if failures:
        lines += ["", "### Not as expected", ""]
        for v in failures:
            lines.append(f"- `{v['case']}` / {v['entry']}: {v['reason'][:400]}")
    lines += ["", "### What the user reads (the first error of each kind)", ""]
    seen: set[str] = set()
    for entry in ("info", "segment", "read_volume"):
        for v in verdicts:
            if v["entry"] == entry and v["expected"] == "error" and v["passed"]:
                if v["kind"] not in seen:
                    seen.add(v["kind"])
                    lines.append(f"- {v['kind']} (`{v['case']}`, {entry}): `{v['reason'][:300]}`")
    lines += ["", "## Untrusted checkpoints", ""]
    attacks = doc["attacks"]
    refused = sum(int(a["refused"] and not a["executed"]) for a in attacks)
    lines.append(
        f"{refused} of {len(attacks)} attacks refused with nothing executed (a pickle payload "
        "whose `__reduce__` would create a marker file; the marker is checked after each)."
    )
    lines.append("")
    lines += _md_table(
        [
            {
                "attack": a["attack"],
                "handed to": a["entry"],
                "refused": "yes" if a["refused"] else "NO",
                "payload ran": "YES" if a["executed"] else "no",
                "message": a["message"][:220],
            }
            for a in attacks
        ]
    )
    lines += ["", "## Kills survived (part B: `omnienc.benchmarks.robustness.interrupts`)", ""]
    lines += [doc["kills"]] if isinstance(doc["kills"], str) else _md_table(doc["kills"])
    lines += ["", "## Peak memory (part B: `omnienc.benchmarks.robustness.memory`)", ""]
    lines += [doc["memory"]] if isinstance(doc["memory"], str) else _md_table(doc["memory"])
    return "\n".join(lines) + "\n"
