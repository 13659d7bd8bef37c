"""`tide`: the command line. Each stage adds its own command module; this file only wires them."""

import importlib
import inspect
import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console

from tide_sglang import __version__
from tide_sglang.bench import BENCHMARKS, BenchReport
from tide_sglang.workloads import DEFAULT_SPEC


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tide")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """TIDE for SGLang: online EAGLE-3 draft adaptation."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("name", type=click.Choice(sorted(BENCHMARKS)))
@click.option("--quick", is_flag=True, help="CI-sized run of the same comparison.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (figures and goals) on stdout.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/bench"), show_default=True,
              help="Directory for the JSON report.")
@click.option("--check", is_flag=True, help="Exit with status 1 when a goal is missed.")
@click.option("-p", "--param", "params", multiple=True, metavar="NAME=VALUE",
              help="A benchmark's own parameter (repeatable; e.g. `tide bench capture -p work_us=3000`).")
@click.option("--device", default=None, metavar="DEVICE",
              help="Where a benchmark that takes it runs (`tide bench train --device cuda`); same as -p device=...")
def bench(name: str, quick: bool, as_json: bool, out: Path, check: bool, params: tuple[str, ...],
          device: str | None) -> None:
    """Run benchmark NAME: a side-by-side comparison in one run; prints figures and goals, writes JSON."""
    # With --json, progress and tables go to stderr so stdout holds exactly one JSON object.
    console = Console(stderr=as_json)
    module = importlib.import_module(BENCHMARKS[name])
    overrides = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", param_hint="--param")
        overrides[key] = json.loads(value) if value[:1].isdigit() or value[:1] in "-[{" else value
    if device is not None:
        overrides["device"] = device
    accepted = [p for p in inspect.signature(module.run).parameters if p not in ("quick", "console")]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise click.BadParameter(f"{name} has no parameter {', '.join(unknown)} (it takes: "
                                 f"{', '.join(accepted) or 'none'})", param_hint="--param")
    if str(overrides.get("device", "cpu")).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise click.BadParameter(f"{overrides['device']}: this machine has no CUDA device (or torch was built "
                                     "without CUDA)", param_hint="--device")
    report: BenchReport = module.run(quick=quick, console=console, **overrides)
    path = report.write(out)
    if as_json:
        click.echo(json.dumps(report.model_dump()))
    else:
        for g in report.goals:
            mark = "[green]met[/]" if g.met else "[red]missed[/]"
            console.print(f"goal {g.name}: {g.value:g} {g.unit} (target {g.target}) {mark}")
    console.print(f"report written to {path}")
    if check and not all(g.met for g in report.goals):
        sys.exit(1)


@main.command()
@click.option("--schedule", default=DEFAULT_SPEC, show_default=True,
              help="Drift schedule: workload:requests,... (workloads: writing, code, math, chat, french, german).")
@click.option("--batch-size", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Requests per wave (on CPU, speculation pays at small batches).")
@click.option("--max-new-tokens", type=click.IntRange(1, 1024), default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same prompts and report.")
@click.option("--target", default="smollm2-135m", show_default=True, help="Target checkpoint dir or smollm2-135m.")
@click.option("--static-requests", type=click.IntRange(1), default=32, show_default=True,
              help="The static draft's training requests (\"train\" prompts of the first phase's workload).")
@click.option("--static-train-steps", type=click.IntRange(1), default=200, show_default=True,
              help="The static draft's offline training steps.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Report directory [runs/<timestamp>].")
def demo(out: Path | None, **options: object) -> None:
    """Serve a drifting workload three ways side by side, wave by wave: no speculation, a static draft, and TIDE
    from a cold draft while a trainer learns it online and versions are hot-swapped as they are published; write
    runs/<timestamp>/report.{md,json} and plot.png. Ctrl-C stops and still reports."""
    from tide_sglang.demo.run import DemoOptions, default_out, run_demo

    console = Console()
    opts = DemoOptions(out=out or default_out(), **options)
    summary = run_demo(opts, console)
    for g in summary.goals:
        console.print(f"goal {g.name}: {g.value:g} {g.unit}, spread {g.spread} (target {g.target}) "
                      + ("[green]met[/]" if g.met else "[red]missed[/]"))
    console.print(f"report: {opts.out / 'report.md'} (plot: {opts.out / 'plot.png'}); "
                  f"published {summary.published or 'nothing'}")


@main.command()
@click.argument("source")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--heads-only", is_flag=True, help="Only the configs and the shards holding the embedding, final norm "
              "and LM head (all the trainer reads of its target).")
def fetch(source: str, dest: Path, heads_only: bool) -> None:
    """Fetch a model (s3://bucket/prefix, or a hub id org/name[@revision]) into DEST, once: an existing DEST is
    kept. The operator's init containers run it (docs/operator.md, "Models"). Safetensors only, never pickle."""
    from tide_sglang.sources import ModelSourceError, fetch_model, parse_model_source

    try:
        path = fetch_model(parse_model_source(source), dest, heads_only=heads_only)
    except ModelSourceError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{source}: {path}")


main.add_command(importlib.import_module("tide_sglang.trainer.cli").train)
main.add_command(importlib.import_module("tide_sglang.draft.cli").import_)
main.add_command(importlib.import_module("tide_sglang.engine.cli").engine)
main.add_command(importlib.import_module("tide_sglang.plugin.cli").serve)
main.add_command(importlib.import_module("tide_sglang.profiler.cli").profile)

if __name__ == "__main__":
    main()
