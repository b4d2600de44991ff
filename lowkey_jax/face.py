"""The detected-face record shared by detection, alignment and the attack."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Face", "face_slots"]


@dataclasses.dataclass(frozen=True)
class Face:
    """One detected face, in pixel coordinates of the image it was found in.

    Attributes:
      box: float64 ``[4]``: ``(x0, y0, x1, y1)``, x to the right, y down, pixel units.
      score: detector confidence in ``[0, 1]``.
      landmarks: float64 ``[5, 2]`` ``(x, y)`` rows in this order: eye on the image's left,
        eye on the image's right, nose tip, mouth corner on the image's left, mouth corner on
        the image's right (MTCNN's order).
    """

    box: np.ndarray
    score: float
    landmarks: np.ndarray

    def __post_init__(self):
        box = np.asarray(self.box, np.float64).reshape(4)
        lm = np.asarray(self.landmarks, np.float64)
        if lm.shape != (5, 2):
            raise ValueError(f"landmarks must have shape (5, 2), got {lm.shape}")
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "landmarks", lm)
        object.__setattr__(self, "score", float(self.score))

    @property
    def inter_ocular(self) -> float:
        """Distance between the two eye centres, in pixels."""
        return float(np.linalg.norm(self.landmarks[1] - self.landmarks[0]))

    def to_dict(self) -> dict:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(self.score, 4),
            "landmarks": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks],
        }


def face_slots(n: int) -> int:
    """Faces are padded to a power of two, so face counts share compiled functions."""
    return 1 << max(0, (n - 1).bit_length())
