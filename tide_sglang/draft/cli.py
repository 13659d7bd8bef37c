"""`tide import`: start a lineage from the user's draft (docs/draft.md, "Importing a draft")."""

from pathlib import Path

import click


@click.command("import")
@click.argument("source", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--registry", help="Draft registry: a directory (created when missing), file:///path or "
              "s3://bucket/prefix; must hold no version yet. [TIDE_REGISTRY_DIR or TIDE_REGISTRY_URL]")
@click.option("--if-empty", is_flag=True, help="Import only into an empty registry; one holding versions is left "
              "as it is (the trainer pod's init container: the lineage starts once).")
def import_(source: Path, registry: str | None, if_empty: bool) -> None:
    """Store the EAGLE-3 draft in SOURCE as version 0 of the registry: a SpecForge export (SGLang or HF layout),
    an SGLang-format draft (with d2t, or without: the whole vocabulary), or a TIDE version. Serve that version
    (`--speculative-draft-model-path REGISTRY/v000000`) and the trainer continues it."""
    # Heavy imports here, so that `tide import --help` answers at once.
    from tide_sglang.draft import DraftVerificationError, open_registry
    from tide_sglang.draft.importer import import_draft
    from tide_sglang.settings import TideSettings

    location = registry or TideSettings().registry
    if location is None:
        raise click.UsageError("no draft registry: pass --registry, or set TIDE_REGISTRY_DIR or TIDE_REGISTRY_URL")
    try:
        store = open_registry(location, create=True)
        if if_empty and (held := store.versions()):
            click.echo(f"{store.location} already holds versions {held}: nothing imported")
            return
        manifest = import_draft(source, store)
    except (ValueError, DraftVerificationError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"imported {source} as v{manifest.version} in {store.location}/v{manifest.version:06d}")
