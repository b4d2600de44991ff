"""Reproduce the fit of the dlib rectangle rule (``DLIB_RECT_CENTER``/``DLIB_RECT_SIDE`` in
lowkey_jax/align.py) and check it on a second set of faces.

The rule maps MTCNN's 5 landmarks to the rectangle dlib's HOG detector
(``get_frontal_face_detector``) would give, because dlib's 5-point shape predictor was
trained on those rectangles: centre ``= m + a e + b n``, side ``= s |e|`` (``m`` the landmark
mean, ``e`` the left-to-right eye vector, ``n`` = ``e`` rotated +90 degrees). Per face,

    a = (c - m) . e / |e|^2,   b = (c - m) . n / |e|^2,   s = (right - left) / |e|

with ``c`` the centre of dlib's rectangle; the constants are the medians over the faces that
dlib's detector (upsample 1 below 1200 px, else 0) and our MTCNN both find (IoU >= 0.3).
Accuracy is what matters downstream: the mean distance, over the 5 points, between our
shape predictor's landmarks from the rule's rectangle and dlib's own predictor's landmarks
from dlib's rectangle, in % of the inter-ocular distance.

    python bench/fit_dlib_rect.py                    # celebs fit + johns check, prints a report
    python bench/fit_dlib_rect.py --out docs/dlib_rect_fit.json

Sets (``$LOWKEY_SHARED``, default ../shared):
- ``faces/celebs``: every photo of the folder (the 61 labelled ones plus the multi-face
  ``couple.jpg`` and ``selfie-many-people.jpg``; ``--labelled-only`` for the 61). This is where
  the constants were fitted (and the labelled photos are also where the thresholds and the
  evaluation run), so the script also reports 2-fold cross-validation (fit on even photos,
  test on odd, and back).
- ``faces/johns``: 55 dlib face chips (150x150, padding 0.25) of 5 other people, from dlib's
  own examples. They are chips, not photos: each is padded by 75 px of grey so that both
  detectors see the whole face, and the faces are small, upright and centred. It is an
  out-of-sample check, not a second fit of equal standing.

Needs ``dlib-bin`` (a test-only dependency).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from lowkey_jax import align
from lowkey_jax.detect import detect_faces
from lowkey_jax.evaluate import load_dataset
from lowkey_jax.imageio import read_image
from lowkey_jax.shape_predictor import load_shape_predictor

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LOWKEY_SHARED", ROOT.parent / "shared"))
SHAPE5 = "face_recognition_models-0.3.0/face_recognition_models/models/shape_predictor_5_face_landmarks.dat"
JOHNS_PAD = 75


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _dlib():
    import dlib

    from lowkey_jax import store

    archive = store.artifact("face-recognition-models", quiet=True)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / "lowkey-fit-dlib-rect"
    out.mkdir(exist_ok=True)
    predictor = dlib.shape_predictor(str(store._extract(archive, SHAPE5, out)))
    return dlib, dlib.get_frontal_face_detector(), predictor


def collect(images, dlib_mods) -> list[dict]:
    """Faces found by both detectors: ``{name, image, landmarks [5,2], rect (l,t,r,b), ref [5,2]}``."""
    dlib, detector, predictor = dlib_mods
    faces = []
    for name, img in images:
        ours = detect_faces(img)
        for r in detector(img, 1 if max(img.shape[:2]) < 1200 else 0):
            rect = (r.left(), r.top(), r.right(), r.bottom())
            best = max(ours, key=lambda f: _iou(rect, f.box), default=None)
            if best is None or _iou(rect, best.box) < 0.3:
                continue
            ref = np.array([[p.x, p.y] for p in predictor(img, r).parts()], np.float64)
            faces.append({"name": name, "image": img, "face": best, "rect": rect, "ref": ref})
    return faces


def per_face(f: dict) -> tuple[float, float, float]:
    """(a, b, s) of one face: dlib's rectangle in the landmark frame."""
    lm = np.asarray(f["face"].landmarks, np.float64)
    e = lm[1] - lm[0]
    n = np.array([-e[1], e[0]])
    l, t, r, b = f["rect"]
    d = np.array([(l + r) / 2, (t + b) / 2]) - lm.mean(axis=0)
    ee = float(e @ e)
    return float(d @ e / ee), float(d @ n / ee), float((r - l) / np.sqrt(ee))


def fit(faces: list[dict]) -> tuple[np.ndarray, float]:
    abs_ = np.array([per_face(f) for f in faces])
    med = np.median(abs_, axis=0)
    return med[:2], float(med[2])


def landmark_errors(faces: list[dict], center, side) -> np.ndarray:
    """Per face: mean distance of our landmarks (rule rectangle) to dlib's (dlib rectangle),
    in % of the inter-ocular distance (distance between the two eye landmarks of MTCNN)."""
    sp = load_shape_predictor()
    old = align.DLIB_RECT_CENTER, align.DLIB_RECT_SIDE
    align.DLIB_RECT_CENTER, align.DLIB_RECT_SIDE = np.asarray(center, np.float64), float(side)
    try:
        out = []
        for f in faces:
            ours = sp.predict(f["image"], align.dlib_rect(f["face"]))
            lm = np.asarray(f["face"].landmarks, np.float64)
            iod = float(np.hypot(*(lm[1] - lm[0])))
            out.append(100.0 * float(np.mean(np.hypot(*(ours - f["ref"]).T))) / iod)
        return np.array(out)
    finally:
        align.DLIB_RECT_CENTER, align.DLIB_RECT_SIDE = old


def _summary(err: np.ndarray) -> dict:
    return {"faces": int(err.size), "mean_pct": round(float(err.mean()), 3),
            "median_pct": round(float(np.median(err)), 3), "worst_pct": round(float(err.max()), 3)}


def celebs_images(shared: Path, labelled_only: bool = False):
    """Every photo of faces/celebs (``labelled_only``: the 61 of labels.csv)."""
    folder = shared / "faces" / "celebs"
    paths = ([p.path for p in load_dataset(folder)] if labelled_only
             else sorted(p for p in folder.iterdir() if p.suffix.lower() == ".jpg"))
    for path in paths:
        yield path.name, read_image(path).rgb


def johns_images(shared: Path):
    for path in sorted((shared / "faces" / "johns").glob("*/*.jpg")):
        chip = read_image(path, min_side=1).rgb
        yield f"{path.parent.name}/{path.name}", np.pad(chip, ((JOHNS_PAD,) * 2, (JOHNS_PAD,) * 2, (0, 0)), constant_values=128)


def report(shared: Path, labelled_only: bool = False) -> dict:
    mods = _dlib()
    const = (align.DLIB_RECT_CENTER.copy(), float(align.DLIB_RECT_SIDE))
    out: dict = {"rule": "centre = m + a e + b n, side = s |e| (lowkey_jax/align.py dlib_rect)",
                 "constants_in_align_py": {"a": float(const[0][0]), "b": float(const[0][1]), "s": const[1]}}

    celebs = collect(celebs_images(shared, labelled_only), mods)
    center, side = fit(celebs)
    out["celebs"] = {
        "photos": len({f["name"] for f in celebs}), "faces": len(celebs),
        "photo_set": "labels.csv only" if labelled_only else "every .jpg in the folder",
        "refit": {"a": round(float(center[0]), 6), "b": round(float(center[1]), 6), "s": round(side, 6)},
        "landmark_error_with_align_py_constants": _summary(landmark_errors(celebs, *const)),
    }
    names = sorted({f["name"] for f in celebs})
    folds = [[f for f in celebs if names.index(f["name"]) % 2 == k] for k in (0, 1)]
    cv = np.concatenate([landmark_errors(folds[1 - k], *fit(folds[k])) for k in (0, 1)])
    out["celebs"]["landmark_error_2fold_cv"] = _summary(cv)

    johns = collect(johns_images(shared), mods)
    jc, js = fit(johns)
    n_chips = len(list((shared / "faces" / "johns").glob("*/*.jpg")))
    out["johns"] = {
        "chips": n_chips, "found_by_both": len(johns), "padding_px": JOHNS_PAD,
        "refit": {"a": round(float(jc[0]), 6), "b": round(float(jc[1]), 6), "s": round(js, 6)},
        "landmark_error_with_align_py_constants": _summary(landmark_errors(johns, *const)),
        "landmark_error_with_johns_refit": _summary(landmark_errors(johns, jc, js)),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--out", type=Path, help="also write the report as JSON")
    ap.add_argument("--labelled-only", action="store_true", help="fit on the 61 photos of labels.csv only")
    args = ap.parse_args()
    res = report(args.shared, args.labelled_only)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
