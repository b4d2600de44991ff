"""Test configuration: strict dtype promotion, shared data location, weights cache.

Missing shared data skips a test on a developer's machine, but under CI (``CI=true``) it is
a failure: a CI run that silently skipped every data test would prove nothing. The same holds
for a missing test dependency (``pip install -e ".[test]"`` installs them all).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

SHARED = Path(os.environ.get("LOWKEY_SHARED", Path(__file__).resolve().parents[2] / "shared"))

# Skip reasons that mean "this machine lacks data or a test dependency".
_MISSING = ("shared data", "LOWKEY_SHARED", "could not import")


def in_ci() -> bool:
    """True when ``$CI`` says so (GitHub Actions, GitLab, ``.ci/run``)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def shared() -> Path:
    """The read-only shared data folder (``$LOWKEY_SHARED``, default ``../shared``)."""
    if not (SHARED / "README.md").is_file():
        msg = f"shared data not found at {SHARED} (set LOWKEY_SHARED)"
        if in_ci():
            pytest.fail(f"{msg}; under CI=true missing data is a failure, not a skip", pytrace=False)
        pytest.skip(msg)
    return SHARED


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, turn skips for missing shared data or test dependencies into failures."""
    report = yield
    if report.skipped and in_ci() and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if any(m in reason for m in _MISSING):
            report.outcome = "failed"
            report.longrepr = f"CI=true: this skip is a failure here: {reason}"
    return report


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


def celebs_chips(shared: Path, name: str, per_identity: int = 2):
    """``[N, h, w, 3]`` float32 chips in [0, 1] for recogniser ``name``: the smallest
    ``per_identity`` photos of each celebs identity (fast to detect), detected by our MTCNN
    and aligned by ``lowkey_jax.align.align`` with that recogniser's own geometry."""
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from lowkey_jax.align import align
    from lowkey_jax.detect import detect_faces
    from lowkey_jax.evaluate import _main_face, load_dataset
    from lowkey_jax.imageio import read_image

    def pixels(path) -> int:
        with Image.open(path) as im:
            return im.size[0] * im.size[1]

    seen: dict[str, int] = {}
    out = []
    for p in sorted(load_dataset(shared / "faces" / "celebs"), key=lambda p: pixels(p.path)):
        if seen.get(p.identity, 0) >= per_identity:
            continue
        img = read_image(p.path).rgb
        faces = detect_faces(img)
        assert faces, p.path.name
        seen[p.identity] = seen.get(p.identity, 0) + 1
        out.append(np.asarray(align(jnp.asarray(img, jnp.float32) / 255.0, _main_face(faces), name)))
    return np.stack(out).astype(np.float32)
