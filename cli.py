"""Thin shim so `python cli.py ...` works from a source checkout; see lowkey_jax/cli.py."""

from lowkey_jax.cli import main

if __name__ == "__main__":
    main()
