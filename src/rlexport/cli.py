"""The `rlexport` command: inspect, export (and verify). Library errors become one line and exit 2."""
from __future__ import annotations

import json
import logging
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .errors import RlexportError

err = Console(stderr=True)
out = Console()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rlexport")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Turn RLHF training checkpoints into Hugging Face folders that vLLM serves."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)


@cli.command("inspect")
@click.argument("ckpt", type=click.Path(path_type=str))
@click.option("--base", help="Base model folder or hub id (for adapters).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def inspect_cmd(ckpt: str, base: str | None, as_json: bool) -> None:
    """Say what a checkpoint is, what will break when served, and how to fix it."""
    from .diagnosis import inspect
    report = inspect(ckpt, base=base)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    from .render import render_inspect
    render_inspect(out, report)


@cli.command("export")
@click.argument("ckpt", type=click.Path(path_type=str))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=str), help="Output folder.")
@click.option("--base", help="Base model folder or hub id (default: from adapter_config.json).")
@click.option("--target", type=click.Choice(["policy", "value"]), default="policy", show_default=True,
              help="policy: the causal LM; value: backbone + value/reward head as a scoring model.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), default="auto",
              show_default=True, help="auto = the base model's dtype, not the trainer's float32.")
@click.option("--max-shard-size", default="5GB", show_default=True)
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.option("--allow-nonfinite", is_flag=True, help="Export tensors holding NaN/Inf instead of refusing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def export_cmd(ckpt, out_dir, base, target, dtype, max_shard_size, force, allow_nonfinite, quiet) -> None:
    """Merge, clean and cast a checkpoint into a Hugging Face folder, streamed and atomic."""
    from .export import plan, write
    from .formats import open_checkpoint
    from .export import check_out
    from pathlib import Path
    src = open_checkpoint(ckpt, base=base)
    check_out(Path(out_dir), src, force=force)
    p = plan(src, target=target, dtype=dtype, allow_nonfinite=allow_nonfinite)
    total = sum(r.nbytes for r in p.tensors)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err, disable=quiet,
                  transient=True) as bar:
        task = bar.add_task(f"export {target}", total=total)
        report = write(p, Path(out_dir), max_shard_size=max_shard_size, force=force,
                       on_bytes=lambda n: bar.advance(task, n))
    if not quiet:
        err.print(f"[green]exported[/] {report.target} to {report.out}: {report.tensors} tensors, "
                  f"{report.bytes / 1e6:.1f} MB {report.dtype} in {report.shards} shard(s) ({p.dtype_reason})")
        err.print(f"serve it with: {report.serve_hint}")


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="rlexport", standalone_mode=False)
    except RlexportError as e:
        if debug:
            raise
        click.echo(e.line(), err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("error[interrupted]: interrupted; nothing was written", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("error[interrupted]: interrupted; nothing was written", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
