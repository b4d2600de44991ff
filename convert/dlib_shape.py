"""Converter for dlib's ``shape_predictor`` (regression-tree cascade, Kazemi & Sullivan 2014).

Source: ``shape_predictor_5_face_landmarks.dat`` (face-recognition-models 0.3.0), written by
``dlib::serialize(const shape_predictor&)`` (dlib 20.0.1 ``image_processing/shape_predictor.h``)::

    int                                   version (== 1)
    matrix<float,0,1>                     initial_shape   (x0, y0, x1, y1, ...; normalised
                                                           face-rect coordinates, rect -> [0,1]^2)
    vector<vector<regression_tree>>       forests         [stage][tree]
        regression_tree = vector<split_feature> splits   (idx1: unsigned long,
                                                          idx2: unsigned long, thresh: float)
                          vector<matrix<float,0,1>> leaf_values
    vector<vector<unsigned long>>         anchor_idx      [stage][feature pixel]
    vector<vector<vector<float,2>>>       deltas          [stage][feature pixel]

Output (flat dict, consumed by :mod:`lowkey_jax.shape_predictor`), with ``S`` stages, ``T``
trees per stage, ``N = 2**depth - 1`` split nodes and ``L = N + 1`` leaves per tree, ``F``
feature pixels per stage and ``P`` landmarks:

=================  ===============  ===========================================================
key                dtype / shape    meaning
=================  ===============  ===========================================================
``initial_shape``  f32 ``[P, 2]``   mean shape in the normalised face rectangle
``anchor_idx``     i32 ``[S, F]``   landmark each feature pixel is anchored to
``deltas``         f32 ``[S, F, 2]`` feature pixel offset from its anchor (normalised units)
``split_idx1``     i32 ``[S, T, N]`` split test: ``pix[idx1] - pix[idx2] > thresh`` -> left
``split_idx2``     i32 ``[S, T, N]``
``split_thresh``   f32 ``[S, T, N]``
``leaf_values``    f32 ``[S, T, L, P, 2]`` shape increment of each leaf
=================  ===============  ===========================================================

Trees are complete binary trees stored breadth first (children of node ``i`` are ``2i+1``
and ``2i+2``; leaf ``j`` is node ``N + j``), exactly as dlib stores them. The converter
checks that every stage has the same tree count, depth and pixel count (true of dlib's
trainer), that every index is in range, and that the stream is consumed to its last byte.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dlib_serialize import DlibSerializationError, Reader

__all__ = ["convert_shape_predictor", "read_shape_predictor"]


def _read_split(r: Reader) -> tuple[int, int, float]:
    return r.read_uint(), r.read_uint(), r.read_float()


def _read_tree(r: Reader) -> tuple[list[tuple[int, int, float]], list[np.ndarray]]:
    splits = r.read_vector(_read_split)
    leaves = r.read_vector(lambda rr: rr.read_matrix(np.float32))
    return splits, leaves


def read_shape_predictor(data: bytes, name: str = "shape_predictor") -> dict[str, np.ndarray]:
    """Decode a serialized ``dlib::shape_predictor`` into the stacked arrays described above."""
    r = Reader(data, name=name)
    version = r.read_int(max_bytes=4)
    if version != 1:
        r.error(f"unexpected shape_predictor version {version} (expected 1)", 0)
    init = r.read_matrix(np.float32)
    if init.ndim != 2 or init.shape[1] != 1 or init.shape[0] % 2 or init.shape[0] == 0:
        raise DlibSerializationError(f"{name}: initial_shape must be a column vector of even length, got {init.shape}")
    n_parts = init.shape[0] // 2
    forests = r.read_vector(lambda rr: rr.read_vector(_read_tree))
    anchors = r.read_vector(lambda rr: rr.read_vector(lambda r3: r3.read_uint()))
    deltas = r.read_vector(lambda rr: rr.read_vector(lambda r3: r3.read_point2()))
    r.expect_end()

    n_stages = len(forests)
    if n_stages == 0 or len(anchors) != n_stages or len(deltas) != n_stages:
        raise DlibSerializationError(
            f"{name}: {n_stages} forests, {len(anchors)} anchor lists, {len(deltas)} delta lists")
    n_trees = len(forests[0])
    n_split = len(forests[0][0][0]) if n_trees else 0
    n_feat = len(anchors[0])
    if n_trees == 0 or n_split == 0 or (n_split + 1) & n_split:
        raise DlibSerializationError(f"{name}: {n_trees} trees of {n_split} splits (need 2**d - 1)")

    idx1 = np.empty((n_stages, n_trees, n_split), np.int64)
    idx2 = np.empty_like(idx1)
    thresh = np.empty((n_stages, n_trees, n_split), np.float32)
    leaves = np.empty((n_stages, n_trees, n_split + 1, n_parts, 2), np.float32)
    for s, forest in enumerate(forests):
        if len(forest) != n_trees or len(anchors[s]) != n_feat or len(deltas[s]) != n_feat:
            raise DlibSerializationError(f"{name}: stage {s} differs in tree or pixel count from stage 0")
        for t, (splits, leaf_values) in enumerate(forest):
            if len(splits) != n_split or len(leaf_values) != n_split + 1:
                raise DlibSerializationError(
                    f"{name}: stage {s} tree {t} has {len(splits)} splits / {len(leaf_values)} leaves, "
                    f"expected {n_split} / {n_split + 1}")
            for k, (a, b, th) in enumerate(splits):
                idx1[s, t, k], idx2[s, t, k], thresh[s, t, k] = a, b, th
            for k, leaf in enumerate(leaf_values):
                if leaf.shape != (2 * n_parts, 1):
                    raise DlibSerializationError(f"{name}: leaf of shape {leaf.shape}, expected ({2 * n_parts}, 1)")
                leaves[s, t, k] = leaf.reshape(n_parts, 2)
    anchor_idx = np.asarray(anchors, np.int64)
    delta_arr = np.asarray(deltas, np.float32)
    if idx1.min() < 0 or idx1.max() >= n_feat or idx2.min() < 0 or idx2.max() >= n_feat:
        raise DlibSerializationError(f"{name}: split pixel index out of range [0, {n_feat})")
    if anchor_idx.min() < 0 or anchor_idx.max() >= n_parts:
        raise DlibSerializationError(f"{name}: anchor index out of range [0, {n_parts})")
    return {
        "initial_shape": init.reshape(n_parts, 2).astype(np.float32),
        "anchor_idx": anchor_idx.astype(np.int32),
        "deltas": delta_arr.reshape(n_stages, n_feat, 2),
        "split_idx1": idx1.astype(np.int32),
        "split_idx2": idx2.astype(np.int32),
        "split_thresh": thresh,
        "leaf_values": leaves,
    }


def convert_shape_predictor(inputs: dict[str, Path]) -> dict[str, np.ndarray]:
    """Manifest entry ``dlib_shape5``: ``inputs["model"]`` is the ``.dat`` file."""
    path = Path(inputs["model"])
    return read_shape_predictor(path.read_bytes(), name=path.name)
