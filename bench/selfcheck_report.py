"""The report of bench/gpu_selfcheck.py: one markdown text (printed, and written beside the JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from my3dgen_cli.fileio import write_text_atomic

STATUS_MARK = {"pass": "PASS", "fail": "FAIL", "skip": "skip", "error": "ERROR", "timeout": "TIMEOUT",
               "not run": "NOT RUN"}


def fmt(value: Any) -> str:
    """Numbers short and readable: 3 significant digits below 1, 2 decimals above; None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:
            return "nan"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}".rstrip("0").rstrip(".")
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v) for v in value)
    return str(value).replace("|", "/")


def table(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return lines


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    gpus = "; ".join(env["gpus"]) or "none"
    lines = [
        "# my3dgen GPU self-check",
        "",
        f"{report['started']}, commit {env['commit']}, {report['mode']}, device {env['device']}; GPUs: {gpus}",
        f"torch {env['torch']} (CUDA build {env['cuda build']}, cuDNN {env['cudnn']}), Python {env['python']}, "
        f"{env['cpu cores']} CPU cores; packages: "
        + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in env["packages"].items()),
        f"command: `{report['command']}`; {report['seconds']:.0f} s in all; "
        f"result: {'PASS' if report['ok'] else 'FAIL'}",
        "",
        "| # | check | status | seconds | summary |",
        "|---:|---|---|---:|---|",
    ]
    for i, c in enumerate(report["checks"], 1):
        lines.append(f"| {i} | {c['name']} | {STATUS_MARK.get(c['status'], c['status'])} | {c['seconds']:.0f} | "
                     f"{fmt(c['summary'])} |")
    for i, c in enumerate(report["checks"], 1):
        lines += ["", f"## {i}. {c['name']}: {c['title']} ({STATUS_MARK.get(c['status'], c['status'])})", ""]
        if c["summary"]:
            lines += [f"{c['summary']} ({c['seconds']:.0f} s, cap {c.get('cap_s', 'n/a')} s)", ""]
        if c.get("error"):
            lines += [f"error: `{c['error']}` (log: {c.get('log', 'n/a')})", ""]
        if c["expects"]:
            lines += table([{"expectation": e["what"], "value": e["value"], "limit": e["limit"],
                             "ok": "ok" if e["ok"] else "FAIL", "limit's source": e["source"]}
                            for e in c["expects"]])
            lines.append("")
        for name, rows in c["tables"].items():
            lines += [f"{name}:", "", *table(rows), ""]
        lines += [f"- {k}: {fmt(v)}" for k, v in c["numbers"].items()]
        lines += [f"- note: {n}" for n in c["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    """gpu_selfcheck.json and gpu_selfcheck.md in `out`, each replaced atomically."""
    write_text_atomic(out / "gpu_selfcheck.json", json.dumps(report, indent=1, default=str))
    write_text_atomic(out / "gpu_selfcheck.md", markdown(report))
