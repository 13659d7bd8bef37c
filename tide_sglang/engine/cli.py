"""`tide engine`: the reference engine as one pod (engine/pod.py)."""

import click


@click.command("engine")
@click.option("--registry", help="Draft registry: a directory, file:///path or s3://bucket/prefix. "
              "[TIDE_REGISTRY_DIR or TIDE_REGISTRY_URL]")
@click.option("--target", envvar="TIDE_TARGET", default="smollm2-135m", show_default=True,
              help="Target checkpoint directory, or smollm2-135m. [TIDE_TARGET]")
@click.option("--schedule", default="writing:8,code:8", show_default=True, help="workload:requests,... per round.")
@click.option("--version", type=click.IntRange(0), help="Draft version the pod starts with (default: none until "
              "the control state names one).")
@click.option("--steps", type=click.IntRange(1, 16), default=3, show_default=True, help="Draft steps per verify.")
@click.option("--batch-size", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 1024), default=32, show_default=True)
@click.option("--rounds", type=click.IntRange(1), help="Rounds of the schedule (default: until SIGTERM).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--http-port", type=click.IntRange(0, 65535), help="Serve SGLang's native /generate on this port "
              "(waves of up to --batch-size requests) instead of the schedule.")
@click.option("--repeat", is_flag=True, help="Serve the same prompts every round (greedy: the same completions), "
              "traffic a draft learns fast; each round draws new ones otherwise.")
def engine(registry: str | None, **options: object) -> None:
    """Serve a workload schedule through the reference engine as one inference pod of a TideDeployment: the
    version the control state names for TIDE_POD_NAME, heartbeats, stats and capture, as an SGLang pod with the
    TIDE plugin does (docs/engine.md). Redis, deployment and pod name come from the TIDE_* variables."""
    from tide_sglang.engine.pod import PodOptions, run_pod
    from tide_sglang.settings import TideSettings

    settings = TideSettings()
    registry = registry or settings.registry
    if registry is None:
        raise click.UsageError("no draft registry: pass --registry, or set TIDE_REGISTRY_DIR or TIDE_REGISTRY_URL")
    steps = run_pod(PodOptions(registry=registry, **options), settings)
    click.echo(f"tide engine: served {steps} verify steps")
