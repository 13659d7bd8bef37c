"""`tide`: the command line. Each stage adds its own command module; this file only wires them."""

import importlib
import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console

from tide_sglang import __version__
from tide_sglang.bench import BENCHMARKS, BenchReport


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
def bench(name: str, quick: bool, as_json: bool, out: Path, check: bool) -> None:
    """Run benchmark NAME: a side-by-side comparison in one run; prints figures and goals, writes JSON."""
    # With --json, progress and tables go to stderr so stdout holds exactly one JSON object.
    console = Console(stderr=as_json)
    module = importlib.import_module(BENCHMARKS[name])
    report: BenchReport = module.run(quick=quick, console=console)
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
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Run the main job on the embedded default (for now: the stream benchmark)."""
    ctx.invoke(bench, name="stream", quick=False, as_json=False, out=Path("runs/bench"), check=False)


main.add_command(importlib.import_module("tide_sglang.trainer.cli").train)

if __name__ == "__main__":
    main()
