"""The `rlexport` command: inspect, export (and verify). Library errors become one line and exit 2."""
from __future__ import annotations

import json
import logging
import os
import sys

import click
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn, TimeRemainingColumn

from .version import __version__
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
@click.option("--scan/--no-scan", default=None, help="Read every tensor for NaN/Inf and float16 range "
              "(default: only up to 2 GB of weights).")
@click.option("--tag", metavar="TAG", help="The step of a run folder to read (DeepSpeed global_stepN, verl "
              "global_step_N, ...; default: the newest the trainer marked done); given, a DeepSpeed raw checkpoint is "
              "read even beside complete HF weights.")
def inspect_cmd(ckpt: str, base: str | None, as_json: bool, scan: bool | None, tag: str | None = None) -> None:
    """Say what a checkpoint is, what will break when served, and how to fix it."""
    from .diagnosis import inspect
    report = inspect(ckpt, base=base, scan="auto" if scan is None else scan, tag=tag)
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
@click.option("--link", type=click.Choice(["auto", "hard", "copy"]), default="auto", show_default=True,
              help="An input shard that comes out unchanged: auto = reflink where the filesystem can, else a kernel "
              "copy; hard = hard link (shares the inode: editing one file in place edits both); copy = always "
              "rewrite the bytes.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--verify", "verify_engine", is_flag=False, flag_value="auto", default=None,
              type=click.Choice(["auto", "vllm", "transformers", "none"]),
              help="Then run `rlexport verify OUT --against CKPT [--engine E]`; exit 1 if a check fails.")
@click.option("--adapter", "adapter_name", metavar="NAME",
              help="Which adapter of a PEFT folder holding several (default: the root's, named `default`).")
@click.option("--no-normalize", "raw_head", is_flag=True, help="--target value: export the raw head, without "
              "the reward normalisation (OpenRLHF mean/std) folded in.")
@click.option("--tag", metavar="TAG", help="The step of a run folder to read (DeepSpeed global_stepN, verl "
              "global_step_N, ...; default: the newest the trainer marked done); given, a DeepSpeed raw checkpoint is "
              "read even beside complete HF weights.")
@click.option("--quantize", metavar="SCHEME", help="Quantize the decoder's Linear layers, data-free, in the "
              "compressed-tensors format vLLM loads: int8 (W8A8), fp8 (FP8_DYNAMIC) or w4a16 (int4, group 128).")
def export_cmd(ckpt, out_dir, base, target, dtype, max_shard_size, force, allow_nonfinite, link, quiet,
               verify_engine=None, adapter_name=None, tag=None, raw_head=False, quantize=None) -> None:
    """Merge, clean and cast a checkpoint into a Hugging Face folder, streamed and atomic."""
    from pathlib import Path

    from .export import check_out, plan, write
    from .formats import open_checkpoint
    if quantize is not None:
        from .quant import get_scheme
        get_scheme(quantize)  # an unknown scheme is refused before the checkpoint is read
    # src.path is the folder --tag / --adapter picked: --verify compares against that one
    src = open_checkpoint(ckpt, base=base, adapter=adapter_name, tag=tag)
    check_out(Path(out_dir), src, force=force)
    p = plan(src, target=target, dtype=dtype, allow_nonfinite=allow_nonfinite, normalize=not raw_head,
             quantize=quantize)
    total = sum(r.nbytes for r in p.tensors)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err, disable=quiet or not err.is_terminal,
                  transient=True) as bar:
        task = bar.add_task(f"export {target}", total=total)
        report = write(p, Path(out_dir), max_shard_size=max_shard_size, force=force,
                       on_bytes=lambda n: bar.advance(task, n), link=link)
    if not quiet:
        err.print(f"[green]exported[/] {report.target} to {report.out}: {report.tensors} tensors, "
                  f"{report.bytes / 1e6:.1f} MB {report.dtype} in {report.shards} shard(s) ({p.dtype_reason})")
        for note in p.notes:
            err.print(f"note: {note}", soft_wrap=True)  # one line, whatever the width
        err.print(f"serve it with: {report.serve_hint}")
    if verify_engine is not None:
        _verify_and_exit(out_dir, against=src.path, base=base, engine=verify_engine, as_json=False, card=True)


@cli.command("verify")
@click.argument("folder", type=click.Path(path_type=str))
@click.option("--against", help="The training checkpoint it came from: compare weights, logprobs, greedy tokens "
              "and head scores with the training-time model.")
@click.option("--base", help="Base model folder or hub id (for an adapter --against).")
@click.option("--engine", type=click.Choice(["auto", "vllm", "transformers", "none"]), default="auto",
              show_default=True, help="Load the folder in this engine (auto: vLLM when installed).")
@click.option("--layerwise/--whole-model", default=None, help="Compute the training-time reference and the export "
              "one module at a time (any model size; default above 2 GiB of float32 weights) or as whole models.")
@click.option("--tensor-parallel-size", "tp", type=click.IntRange(1, 1024), default=None,
              help="Fail if vLLM would refuse to shard the model over this many ranks; names the sizes that work.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def verify_cmd(folder: str, against: str | None, base: str | None, engine: str, as_json: bool,
               tp: int | None, layerwise: bool | None) -> None:
    """Prove an exported folder is right: structure, numbers against training, a real engine. Exit 0 only if
    every check passes."""
    if base is not None and against is None:
        raise click.UsageError("--base needs --against")
    _verify_and_exit(folder, against=against, base=base, engine=engine, as_json=as_json, tp=tp,
                     layerwise=layerwise)


@cli.command("serve", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("ckpt", type=click.Path(path_type=str))
@click.option("--base", help="Base model folder or hub id (default: from adapter_config.json).")
@click.option("--target", type=click.Choice(["policy", "value"]), default="policy", show_default=True,
              help="policy: generate; value: the value/reward head through vLLM's pooling runner.")
@click.option("--no-normalize", "raw_head", is_flag=True, help="--target value: the raw head, without the reward "
              "normalisation folded in.")
@click.option("--adapter", "adapter_name", metavar="NAME", help="Which adapter of a PEFT folder holding several.")
@click.option("--tag", metavar="TAG", help="The DeepSpeed / verl checkpoint step to serve.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the server listens on "
              "(0.0.0.0: every interface; the --follow control endpoints still answer only this host).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--follow", is_flag=True, help="CKPT is a training run folder: serve its newest complete "
              "checkpoint and swap each newer complete one into the running server in place.")
@click.option("--poll", type=click.FloatRange(0.1), default=2.0, show_default=True,
              help="--follow: seconds between looks at the run folder.")
@click.option("--print-only", is_flag=True, help="Print the vLLM server command and exit.")
@click.pass_context
def serve_cmd(ctx, ckpt, base, target, raw_head, adapter_name, tag, host, port, follow, poll, print_only) -> None:
    """Serve a raw training checkpoint with vLLM's OpenAI server through the rlexport load format (no export
    step), started from this Python. Arguments after `--` go to the vLLM server. Ctrl-C / SIGTERM stop it all."""
    from .engines.follow import Options, serve
    if follow and tag is not None:
        raise click.UsageError("--follow serves the newest complete step; --tag picks one: pass one of them")
    opts = Options(base=base, target=target, normalize=not raw_head, adapter=adapter_name, tag=tag, host=host,
                   port=port, extra=tuple(ctx.args), poll=poll)
    code = serve(ckpt, opts, follow=follow, print_only=print_only)
    if code:
        sys.exit(code)


def _verify_and_exit(folder, *, against, base, engine: str, as_json: bool, tp: int | None = None,
                     layerwise: bool | None = None, card: bool = False) -> None:
    from .verify import verify
    report = verify(folder, against=against, base=base, engine=engine, tensor_parallel_size=tp,
                    layerwise=layerwise).to_json()
    if card:  # export --verify: the export's README.md records the verdict (model_card.py says why after the commit)
        from pathlib import Path
        from .model_card import record_verdict
        record_verdict(Path(folder), report)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        from .render import render_verify
        render_verify(out, report)
    if not report["ok"]:
        sys.exit(1)


def _catch_signals(received: list[int]) -> dict:
    """SIGINT and SIGTERM both stop the command through KeyboardInterrupt (so the export's temporary folder is
    removed on the way out), except inside the writer's uninterruptible steps, which finish first."""
    import signal
    import threading

    from .output.atomic import deferred_signals, in_uninterruptible

    def on_signal(signum, frame):
        if in_uninterruptible():
            deferred_signals.append(signum)
            return
        received.append(signum)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        return {}
    deferred_signals.clear()
    return {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}


def _exit_now() -> None:
    """The command is done and its output committed and fsynced: skip the interpreter's teardown (torch's takes
    ~0.5 s, a tenth of a small export) in a real `rlexport` process; calls from Python (argv given) return."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    import signal
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    received: list[int] = []
    previous = _catch_signals(received)
    try:
        cli.main(args=argv, prog_name="rlexport", standalone_mode=False)
        from .output.atomic import deferred_signals
        if deferred_signals:
            click.echo("note: an interrupt arrived while the export was being moved into place; it completed",
                       err=True)
        if argv is None:
            _exit_now()
    except RlexportError as e:
        if debug:
            raise
        click.echo(e.line(), err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns KeyboardInterrupt into Abort
        sig = received[-1] if received else signal.SIGINT
        click.echo(f"error[interrupted]: stopped by {signal.Signals(sig).name}; nothing was written (no partial "
                   "output, temporary files removed)", err=True)
        sys.exit(128 + sig)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
