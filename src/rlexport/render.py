"""Terminal rendering of inspect reports (rich tables); JSON output never goes through here."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

COLORS = {"error": "red", "warning": "yellow", "info": "cyan"}


def render_inspect(console: Console, report: dict) -> None:
    head = Table(show_header=False, box=None, pad_edge=False)
    for key in ("path", "format", "producer", "stage", "architecture", "base", "targets", "dtypes"):
        value = report.get(key)
        head.add_row(f"[bold]{key}[/]", ", ".join(map(str, value)) if isinstance(value, list) else
                     ", ".join(f"{k}: {v}" for k, v in value.items()) if isinstance(value, dict) else str(value))
    for group, info in report.get("tensors", {}).items():
        head.add_row(f"[bold]{group} tensors[/]", f"{info['count']} ({info['bytes'] / 1e6:.2f} MB)")
    console.print(head)
    if not report["findings"]:
        console.print("no findings")
        return
    t = Table(title="findings", show_lines=True)
    for col in ("code", "severity", "what", "vLLM / transformers", "fix"):
        t.add_column(col, overflow="fold")
    for f in report["findings"]:
        sev = f["severity"]
        t.add_row(f["code"], f"[{COLORS[sev]}]{sev}[/]", f["message"], f["engine"], f["fix"])
    console.print(t)
