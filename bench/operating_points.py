"""Fit and check each recogniser's operating point (``lowkey_jax/operating_points.json``).

Shipped thresholds are kept as they are; this script reports their false-accept and
false-reject rates on the clean photos. A recogniser marked ``"fitted": true`` (its
software ships no threshold) gets the threshold at a 0.1% false-accept rate on the clean
impostor pairs (our own detect -> align -> embed pipeline).

    python bench/operating_points.py [DATA]     # default: ../shared/faces/celebs
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np

from lowkey_jax.evaluate import clean_embeddings, load_dataset
from lowkey_jax.store import home
from lowkey_jax.verification import PATH, far_threshold, scores

ROOT = Path(__file__).resolve().parents[1]
FAR = 0.001


def main() -> None:
    data = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(os.environ.get("LOWKEY_SHARED", ROOT.parent / "shared")) / "faces" / "celebs"
    doc = json.loads(PATH.read_text())
    models = list(doc["recognizers"])
    cache = home() / "bench" / f"clean_embeddings_{data.name}.npz"
    have = dict(np.load(cache)) if cache.is_file() else {}
    if all(m in have for m in models):  # embeddings of the clean photos, from an earlier run
        labels, emb = list(have["labels"]), {m: have[m] for m in models}
    else:
        labels, emb, _ = clean_embeddings(load_dataset(data), models)
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez(cache, labels=np.asarray(labels), **emb)
    labels = np.asarray(labels)
    iu = np.triu_indices(len(labels), k=1)
    same = (labels[:, None] == labels[None, :])[iu]
    for m in models:
        op = doc["recognizers"][m]
        e = np.asarray(emb[m], np.float64)
        s = scores(e[:, None, :], e[None, :, :], op["metric"])[iu]
        if op.get("fitted"):
            t = far_threshold(s[~same], FAR)
            op["threshold"] = round(t if op["metric"] == "cosine" else -t, 4)
            op["fitted_on"] = {"data": data.name, "photos": int(len(labels)), "impostor_pairs": int((~same).sum()),
                               "far": FAR, "date": datetime.date.today().isoformat()}
        t = op["threshold"] if op["metric"] == "cosine" else -op["threshold"]
        op["clean_check"] = {"data": data.name, "far": round(float(np.mean(s[~same] >= t)), 4),
                             "frr": round(float(np.mean(s[same] < t)), 4),
                             "same_pairs": int(same.sum()), "impostor_pairs": int((~same).sum())}
        print(f"{m}: {op['metric']} threshold {op['threshold']} ({'fitted' if op.get('fitted') else 'shipped'}); "
              f"on clean {data.name}: FAR {op['clean_check']['far']:.4f}, FRR {op['clean_check']['frr']:.4f}")
    PATH.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
