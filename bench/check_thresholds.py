"""Check the same-person thresholds of lowkey_jax/thresholds.json on faces they were not
fitted on.

``bench/thresholds.py`` fits each threshold at the equal error rate on the 61 celebs photos,
the same photos the evaluation then uses. The only other labelled faces in the shared data
are the 55 johns chips (5 identities x 11, dlib's own example chips: 150x150, aligned by
dlib with padding 0.25). For every recogniser this script runs this package's full pipeline
(MTCNN -> align -> embed) on each chip padded by 75 px of grey, and, for dlib, also embeds the
chips directly (they are already dlib's input). It reports, at the stored threshold, the
false-accept rate (different people matched) and false-reject rate (same person missed)
over all chip pairs, next to the johns set's own equal-error-rate threshold.

    python bench/check_thresholds.py [--out docs/thresholds_johns.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from lowkey_jax.detect import detect_faces
from lowkey_jax.evaluate import _main_face
from lowkey_jax.imageio import read_image
from lowkey_jax.metrics import eer_threshold, pair_scores
from lowkey_jax.pipeline import embed_faces, thresholds
from lowkey_jax.recognizers import RECOGNIZERS, load_recognizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWKEY_SHARED", ROOT.parent / "shared"))
PAD = 75


def _rates(emb: np.ndarray, labels: list[str], t: float) -> dict:
    s, same = pair_scores(emb, labels)
    t_eer, eer = eer_threshold(s, same)
    return {"far_at_stored": round(float(np.mean(s[~same] >= t)), 4),
            "frr_at_stored": round(float(np.mean(s[same] < t)), 4),
            "johns_eer_threshold": round(float(t_eer), 4), "johns_eer": round(float(eer), 4),
            "pairs": {"same": int(same.sum()), "different": int((~same).sum())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    files = sorted((args.shared / "faces" / "johns").glob("*/*.jpg"))
    chips = [read_image(f, min_side=1).rgb for f in files]
    labels = [f.parent.name for f in files]
    stored = thresholds()
    out: dict = {"data": "faces/johns", "chips": len(files), "identities": len(set(labels)),
                 "padding_px": PAD, "stored_thresholds": stored, "pipeline": {}}

    padded = [np.pad(c, ((PAD, PAD), (PAD, PAD), (0, 0)), constant_values=128) for c in chips]
    faces = [detect_faces(p) for p in padded]
    keep = [i for i, f in enumerate(faces) if f]
    out["detected"] = len(keep)
    for m in RECOGNIZERS:
        emb = np.stack([embed_faces(padded[i], [_main_face(faces[i])], m)[0] for i in keep])
        out["pipeline"][m] = _rates(emb, [labels[i] for i in keep], stored[m])
    if "dlib" in RECOGNIZERS:
        rec = load_recognizer("dlib")
        x = jnp.asarray(np.stack(chips).astype(np.float32) / np.float32(255.0))
        out["dlib_on_the_chips_directly"] = _rates(np.asarray(rec.embed(x)), labels, stored["dlib"])
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
