"""`tide import`: start a lineage from the user's draft (docs/draft.md, "Importing a draft")."""

from pathlib import Path

import click


@click.command("import")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--registry", "registry_dir", type=click.Path(path_type=Path), envvar="TIDE_REGISTRY_DIR",
              required=True, help="Draft registry directory, created when missing; must hold no version yet. "
              "[TIDE_REGISTRY_DIR]")
def import_(source: Path, registry_dir: Path) -> None:
    """Store the EAGLE-3 draft in SOURCE as version 0 of the registry: a SpecForge export (SGLang or HF layout),
    an SGLang-format draft (with d2t, or without: the whole vocabulary), or a TIDE version. Serve that version
    (`--speculative-draft-model-path REGISTRY/v000000`) and the trainer continues it."""
    # Heavy imports here, so that `tide import --help` answers at once.
    from tide_sglang.draft import DraftRegistry, DraftVerificationError
    from tide_sglang.draft.importer import import_draft

    try:
        manifest = import_draft(source, DraftRegistry(registry_dir, create=True))
    except (ValueError, DraftVerificationError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"imported {source} as v{manifest.version} in {registry_dir}: "
               f"{DraftRegistry(registry_dir).path(manifest.version)}")
