"""Test configuration: strict dtype promotion, shared data location, weights cache."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED = Path(os.environ.get("LOWKEY_SHARED", Path(__file__).resolve().parents[2] / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    """The read-only shared data folder (``$LOWKEY_SHARED``, default ``../shared``)."""
    if not (SHARED / "README.md").is_file():
        pytest.skip(f"shared data not found at {SHARED} (set LOWKEY_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def source_file(tmp_path_factory):
    """``source_file(artifact_key, member) -> Path``: one original model file, extracted from
    its sha256-verified source archive (fetched into the weights cache if needed)."""
    from lowkey_jax import store

    def get(artifact_key: str, member: str) -> Path:
        archive = store.artifact(artifact_key, quiet=True)
        out = tmp_path_factory.mktemp(artifact_key)
        return store._extract(archive, member, out)

    return get
