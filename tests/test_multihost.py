"""Multi-host ``cloak`` for real: two CPU processes joined by ``jax.distributed`` on
localhost (gloo collectives), each with its own photo, one global batch sharded over both.
Each process must get back its own photo's cloak, equal to a single-process run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

_WORKER = r"""
import json, sys
import numpy as np
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, n, photo, out, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], int(sys.argv[6])
if n > 1:
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=n, process_id=pid)
from lowkey_jax.attack import Config, _get_attack, cloak
img = np.load(photo)
cfg = Config(models=("sface",), steps=abs(steps), blur=False)
seen = []  # steps < 0: with a progress callback (the segmented attack, as the web app runs it)
r = cloak([img], cfg, evaluate=False, progress=(lambda s, t: seen.append([s, t])) if steps < 0 else None)[0]
np.save(out, r.image)
attack = _get_attack(cfg)
print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                  "mesh": attack.n_devices, "faces": len(r.faces), "distance": r.distance, "progress": seen}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp_path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOWKEY_JAX_NO_COMPILE_CACHE": "1"}
    env.pop("XLA_FLAGS", None)
    return env


@pytest.mark.parametrize("steps", [2, -7], ids=["one-call", "progress-segments"])
def test_two_processes_each_get_their_own_cloak(tmp_path, shared, steps):
    """steps 2: the attack in one call (the CLI); -7: 7 steps with a progress callback, run
    as compiled segments of 5 and 2 steps with progress reported between them (the web
    app's and library's path), in every process."""
    base = Image.open(shared / "faces" / "celebs" / "img25.jpg").convert("RGB").resize((192, 192), Image.BILINEAR)
    photos = [np.asarray(base), np.asarray(base.transpose(Image.FLIP_LEFT_RIGHT))]  # same shape, one face each
    paths = []
    for i, p in enumerate(photos):
        paths.append(tmp_path / f"in{i}.npy")
        np.save(paths[-1], p)
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(port), str(i), "2", str(paths[i]), str(tmp_path / f"out{i}.npy"),
                          str(steps)],
                         env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    # the same photo alone in one process, run alongside: the reference
    ref = subprocess.Popen([sys.executable, "-c", _WORKER, "0", "0", "1", str(paths[1]), str(tmp_path / "ref1.npy"), str(steps)],
                           env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    procs.append(ref)
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [o["processes"] for o in outs] == [2, 2, 1] and [o["mesh"] for o in outs] == [2, 2, 1]
    assert [o["faces"] for o in outs] == [1, 1, 1]
    assert all(o["progress"] == ([[5, 7], [7, 7]] if steps < 0 else []) for o in outs), [o["progress"] for o in outs]
    # the two-process cloak of photo 1 equals the one-process one (per-photo keys do not
    # depend on the batch), up to float summation differences of one grey level
    got = [np.load(tmp_path / f"out{i}.npy") for i in range(2)]
    for g, p in zip(got, photos):
        assert g.shape == p.shape and np.abs(g.astype(int) - p.astype(int)).max() > 0
    diff = np.abs(got[1].astype(int) - np.load(tmp_path / "ref1.npy").astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
    assert abs(outs[1]["distance"] - outs[2]["distance"]) < 1e-3
