"""The test suite's own rules: under CI, missing data fails instead of skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_shared_data_is_there(shared):
    assert (shared / "README.md").is_file()


def _run_probe(tmp_path, ci: str | None, test_id: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(LOWKEY_SHARED=str(tmp_path / "nowhere"), PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"tests/test_suite.py::{test_id}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("test_id", ["test_shared_data_is_there", "test_missing_dependency_probe"])
def test_missing_shared_data_or_dependency_fails_under_ci_and_skips_elsewhere(tmp_path, test_id):
    local = _run_probe(tmp_path, None, test_id)
    assert local.returncode == 0 and "1 skipped" in local.stdout, local.stdout + local.stderr
    ci = _run_probe(tmp_path, "true", test_id)
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "CI=true" in ci.stdout and ("shared data not found" in ci.stdout or "could not import" in ci.stdout)


def test_missing_dependency_probe():
    """Stands for a parity test whose reference implementation is not installed."""
    if "LOWKEY_SHARED" in os.environ and Path(os.environ["LOWKEY_SHARED"]).name == "nowhere":
        pytest.importorskip("a_test_dependency_that_is_not_installed")


def test_fit_reports_match_the_constants_in_the_code():
    """The committed reports of bench/fit_dlib_rect.py and bench/check_thresholds.py describe
    the constants the code uses now (rerun those scripts after changing a constant)."""
    import json

    import numpy as np

    from lowkey_jax import align
    from lowkey_jax.pipeline import thresholds

    fit = json.loads((ROOT / "docs" / "dlib_rect_fit.json").read_text())
    used = fit["constants_in_align_py"]
    assert np.allclose([used["a"], used["b"], used["s"]], [*align.DLIB_RECT_CENTER, align.DLIB_RECT_SIDE], atol=1e-6)
    refit = fit["celebs"]["refit"]
    assert np.allclose([refit["a"], refit["b"], refit["s"]], [*align.DLIB_RECT_CENTER, align.DLIB_RECT_SIDE], atol=1e-6)
    johns = json.loads((ROOT / "docs" / "thresholds_johns.json").read_text())
    th = thresholds()
    for name, t in johns["stored_thresholds"].items():
        assert abs(t - th[name]) < 1e-9, f"docs/thresholds_johns.json is stale for {name}"
