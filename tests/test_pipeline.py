"""The full pipeline (our detector + alignment + embedding) on real labelled photos."""

from __future__ import annotations

import numpy as np
import pytest

from lowkey_jax.detect import detect_faces
from lowkey_jax.evaluate import _main_face, load_dataset
from lowkey_jax.face import Face
from lowkey_jax.imageio import read_image
from lowkey_jax.metrics import cosine_matrix, eer_threshold, pair_scores
from lowkey_jax.pipeline import embed_faces, match_faces, thresholds
from lowkey_jax.recognizers import RECOGNIZERS

SHAPE5 = "face_recognition_models-0.3.0/face_recognition_models/models/shape_predictor_5_face_landmarks.dat"
RESNET = "face_recognition_models-0.3.0/face_recognition_models/models/dlib_face_recognition_resnet_model_v1.dat"


@pytest.fixture(scope="module")
def celebs(shared):
    photos = load_dataset(shared / "faces" / "celebs")
    out = []
    for p in photos:
        img = read_image(p.path).rgb
        faces = detect_faces(img)
        assert faces, f"no face found in {p.path.name}"
        out.append((p, img, _main_face(faces)))
    return out


@pytest.fixture(scope="module")
def embeddings(celebs):
    return {m: np.stack([embed_faces(img, [face], m)[0] for _, img, face in celebs]) for m in RECOGNIZERS}


# Required leave-one-out rank-1 (the ensemble's three: 0.95; the two graders added later,
# which the default attack never sees: 0.90, issue 11).
RANK1_MIN = {"facenet128": 0.90, "arcface-mobilenet": 0.90}
EER_MAX = {"facenet128": 0.05, "arcface-mobilenet": 0.05}


@pytest.mark.parametrize("name", list(RECOGNIZERS))
def test_leave_one_out_rank1_identification(name, celebs, embeddings):
    labels = np.array([p.identity for p, _, _ in celebs])
    s = cosine_matrix(embeddings[name], embeddings[name])
    np.fill_diagonal(s, -np.inf)  # each photo is a probe against all the others
    rank1 = float(np.mean(labels[np.argmax(s, axis=1)] == labels))
    need = RANK1_MIN.get(name, 0.95)
    print(f"{name}: leave-one-out rank-1 {rank1:.4f} over {len(labels)} photos")
    assert rank1 >= need, f"{name}: leave-one-out rank-1 {rank1:.3f} < {need}"


@pytest.mark.parametrize("name", list(EER_MAX))
def test_equal_error_rate(name, celebs, embeddings):
    """All photo pairs, cosine scores: the EER of the added recognisers through our pipeline."""
    scores, same = pair_scores(embeddings[name], [p.identity for p, _, _ in celebs])
    _, eer = eer_threshold(scores, same)
    print(f"{name}: EER {eer:.4f}")
    assert eer <= EER_MAX[name], f"{name}: EER {eer:.4f} > {EER_MAX[name]}"


def test_thresholds_file_matches_the_models(embeddings):
    th = thresholds()
    assert set(th) == set(RECOGNIZERS)
    for name, t in th.items():
        assert -1.0 < t < 1.0


def test_dlib_pipeline_agrees_with_dlib_bin(celebs, embeddings, source_file):
    """Our MTCNN + 5-point predictor + chip + ResNet vs dlib's own HOG detector, predictor,
    get_face_chip and compute_face_descriptor, on the same photos."""
    dlib = pytest.importorskip("dlib")
    detector = dlib.get_frontal_face_detector()
    predictor = dlib.shape_predictor(str(source_file("face-recognition-models", SHAPE5)))
    recognizer = dlib.face_recognition_model_v1(str(source_file("face-recognition-models", RESNET)))
    cosines = []
    for i, (p, img, face) in enumerate(celebs):
        scale = min(1.0, 1600 / max(img.shape[:2]))  # keep dlib's HOG detector fast
        small = img if scale == 1.0 else np.ascontiguousarray(img[:: int(round(1 / scale)), :: int(round(1 / scale))])
        step = img.shape[0] / small.shape[0]
        rects = detector(small, 1)
        if not rects:
            continue
        boxes = [Face([r.left() * step, r.top() * step, r.right() * step, r.bottom() * step], 1.0, np.zeros((5, 2))) for r in rects]
        match = match_faces([face], boxes)[0]
        if match is None:
            continue
        r = rects[boxes.index(match)]
        rect = dlib.rectangle(int(r.left() * step), int(r.top() * step), int(r.right() * step), int(r.bottom() * step))
        shape = predictor(img, rect)
        ref = np.asarray(recognizer.compute_face_descriptor(img, shape))
        ours = embeddings["dlib"][i]
        cosines.append(float(np.dot(ref, ours) / (np.linalg.norm(ref) * np.linalg.norm(ours))))
    assert len(cosines) >= 0.8 * len(celebs), f"dlib found only {len(cosines)} of {len(celebs)} faces"
    assert np.mean(cosines) >= 0.99, f"mean cosine {np.mean(cosines):.4f}, min {np.min(cosines):.4f}"
