"""Measure each recogniser's same-person cosine threshold at equal error rate on clean
photos (detect -> align -> embed with this package's own pipeline) and write them to
lowkey_jax/thresholds.json, which `lowkey-jax compare` and reports use.

    python bench/thresholds.py [DATA]      # default: ../shared/faces/celebs

Provenance: the stored thresholds are fitted on the 61 labelled celebs photos, the same
photos the evaluation uses. tests/test_pipeline.py recomputes them and fails on drift;
bench/check_thresholds.py checks them on the johns chips (docs/thresholds_johns.json).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path


from lowkey_jax.evaluate import clean_embeddings, load_dataset
from lowkey_jax.metrics import eer_threshold, pair_scores
from lowkey_jax.recognizers import RECOGNIZERS

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("LOWKEY_SHARED", ROOT.parent / "shared")) / "faces" / "celebs"
    photos = load_dataset(data)
    labels, emb, cs = clean_embeddings(photos, tuple(RECOGNIZERS))  # each photo's largest face
    for skipped in cs.skipped:
        print(f"{skipped['file']}: {skipped['reason']}, skipped", file=sys.stderr)
    out = {"thresholds": {}, "eer": {}, "pairs": {}, "data": str(data.name), "photos": len(labels),
           "identities": len(set(labels)), "measured": datetime.date.today().isoformat(),
           "notes": "cosine >= threshold means 'same person'; equal-error-rate point on all photo pairs"}
    for m in RECOGNIZERS:
        s, same = pair_scores(emb[m], labels)
        t, eer = eer_threshold(s, same)
        out["thresholds"][m], out["eer"][m] = round(t, 4), round(eer, 4)
        out["pairs"][m] = {"same": int(same.sum()), "different": int((~same).sum())}
        print(f"{m}: threshold {t:.4f}, EER {eer:.4f}")
    (ROOT / "lowkey_jax" / "thresholds.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
