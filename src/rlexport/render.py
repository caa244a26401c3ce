"""Terminal rendering of inspect and verify reports (rich tables); JSON output never goes through here.

Both renderers take the JSON form of the report, so what people read and what scripts parse cannot drift.
Paths under the current directory are shown relative to it.
"""
from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape
from rich.table import Table

COLORS = {"error": "red", "warning": "yellow", "info": "cyan"}
STATUS = {"pass": "[green]PASS[/]", "fail": "[bold red]FAIL[/]", "skip": "[dim]skip[/]"}


def _short(text) -> str:
    """Paths under the working directory, relative; markup escaped."""
    here = os.getcwd().rstrip("/") + "/"
    return escape(str(text).replace(here, ""))


def _value(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def render_inspect(console: Console, report: dict) -> None:
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(style="bold", no_wrap=True)
    head.add_column(overflow="fold")
    for key in ("path", "format", "producer", "stage", "architecture", "base", "targets"):
        head.add_row(key, _short(_value(report.get(key))))
    if report.get("adapter"):
        a = report["adapter"]
        head.add_row("adapter", f"{a['peft_type']} r={a['r']} alpha={a['alpha']}, {a['modules']} modules"
                     + (f", full tensors: {', '.join(a['full_tensors'][:3])}" if a["full_tensors"] else ""))
    if report.get("head"):
        h = report["head"]
        head.add_row("head", f"{h['role']} head ({h.get('convention', 'trl-v-head')}): " + ", ".join(
            f"{t['name']} {t['shape']} {t['dtype']}" for t in h["tensors"]))
        if h.get("serves"):
            other = f"; --no-normalize: {h['raw_serves']}" if h.get("normalization_folded") else ""
            head.add_row("serves", f"--target value serves the {h['serves']}" + (
                f" (mean {h['mean']:g}, std {h['std']:g} folded in)" if h.get("normalization_folded") else "") + other)
    v = report.get("vocab") or {}
    if any(v.values()):
        head.add_row("vocab", f"config {v.get('config')}, embedding rows {v.get('embedding_rows')}, "
                     f"tokenizer {v.get('tokenizer')}")
    for group, info in report.get("tensors", {}).items():
        count = f"{info['count']} tensors" if info.get("count") is not None else f"{len(info['files'])} files"
        dtypes = ", ".join(f"{k} {n}" for k, n in info.get("dtypes", {}).items())
        label = f"{group} files" if info.get("count") is None else f"{group} tensors"
        head.add_row(label, f"{count}, {_mb(info['bytes'])}" + (f" ({dtypes})" if dtypes else ""))
    moe = report.get("moe")
    if moe:
        head.add_row("experts", f"{moe['experts']} routed, top-{moe['top_k']}, expert size {moe['expert_size']}"
                     f"; shared: {moe['shared_experts'] or 'none'}; layout found {moe['layout_found']}, "
                     f"written {moe['layout_written']} (the base model's hub checkpoint layout)")
    t = report.get("trainer") or {}
    if t.get("steps"):
        head.add_row("steps", ", ".join(s["tag"] + ("" if s["complete"] else f" (unfinished: {s['why']})")
                                        for s in t["steps"]))
    if t.get("trainer"):  # Megatron / NeMo-RL readers: trainer, layout saved with, padded vocabulary, optimizer
        lay = t.get("parallel_layout") or {}
        opt = t.get("optimizer_state")
        head.add_row("trainer", t["trainer"] + (" saved with " + " x ".join(f"{k.upper()}={v}" for k, v in lay.items())
                                                 if lay else "")
                     + (f"; vocabulary padded to {t['padded_vocab_size']} rows, cut to {t['vocab_size']}"
                        if (t.get("padded_vocab_size") or 0) > (t.get("vocab_size") or 1 << 62) else "")
                     + (f"; optimizer state {_mb(opt['bytes'])} (never read)" if opt else ""))
    tp = report.get("tensor_parallel") or {}
    if tp.get("sizes"):
        refused = "; ".join(f"{k}: {v}" for k, v in tp.get("refused", {}).items())
        head.add_row("tensor parallel", f"vLLM accepts {', '.join(map(str, tp['sizes']))}"
                     + (f" (refuses {refused})" if refused else ""))
    quant = report.get("quantize") or {}
    if quant:
        head.add_row("--quantize", "; ".join(
            f"{k}: {v['quantized']} linears" + (f", {v['left_count']} left unquantized (input size not a multiple "
                                                f"of the group), e.g. {v['left_unquantized'][0]}" if v["left_count"]
                                                else "") for k, v in quant.items()))
        for k, v in quant.items():
            if v.get("note"):
                head.add_row(f"--quantize {k}", f"[yellow]{v['note']}[/]")
    for target, cmd in (report.get("serve_commands") or {}).items():
        head.add_row(f"serve {target}", f"{_short(cmd)}  [dim](vLLM straight from the checkpoint, no export)[/]")
    if not report.get("complete", True):
        head.add_row("note", "[yellow]partial diagnosis: the checkpoint could not be opened (see the error)[/]")
    console.print(head)
    findings = report["findings"]
    if not findings:
        console.print("no findings: export it with `rlexport export`")
        return
    t = Table(title=f"{len(findings)} finding(s)", show_lines=True, expand=True)
    t.add_column("finding", no_wrap=True)
    t.add_column("what it is · what engines do with it · the fix", overflow="fold", ratio=1)
    for f in findings:
        sev = f["severity"]
        body = _short(f["message"])
        if f.get("engine"):
            body += f"\n[dim]engines:[/] {_short(f['engine'])}"
        if f.get("fix"):
            body += f"\n[dim]fix:[/] {_short(f['fix'])}"
        t.add_row(f"[{COLORS[sev]}]{sev}[/]\n{f['code']}", body)
    console.print(t)


def render_verify(console: Console, report: dict) -> None:
    console.print(f"[bold]verify[/] {_short(report['path'])}: {report.get('architecture') or '?'} "
                  f"({report.get('target') or '?'}, {report.get('dtype') or '?'})")
    against = f"against {_short(report['against'])}" if report.get("against") else "no --against: numbers skipped"
    console.print(f"{against}; engine {report['engine']}")
    t = Table(show_lines=False, expand=True)
    t.add_column("check", no_wrap=True)
    t.add_column("stage", no_wrap=True, style="dim")
    t.add_column("result", no_wrap=True)
    t.add_column("evidence", overflow="fold", ratio=1)
    for c in report["checks"]:
        text = _short(c["summary"])
        if c["status"] == "fail" and c["details"]:
            text += "".join(f"\n[dim]-[/] {_short(d)}" for d in c["details"][:4])
        t.add_row(c["name"], c["stage"], STATUS[c["status"]], text)
    console.print(t)
    n = {s: sum(c["status"] == s for c in report["checks"]) for s in STATUS}
    if report["ok"]:
        console.print(f"[green]OK[/]: {n['pass']} passed, {n['skip']} skipped")
    else:
        console.print(f"[bold red]FAILED[/]: {', '.join(report['failed'])} ({n['fail']} failed, {n['pass']} "
                      f"passed, {n['skip']} skipped)")
