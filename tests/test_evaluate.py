"""End-to-end protection evaluation on a tiny labelled subset with few steps."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lowkey_jax.cli import app
from lowkey_jax.evaluate import load_dataset


@pytest.fixture(scope="module")
def tiny(shared, tmp_path_factory):
    celebs = shared / "faces" / "celebs"
    rows = [r.split(",") for r in (celebs / "labels.csv").read_text().split()[1:]]
    by_id: dict[str, list[str]] = {}
    for f, ident in rows:
        by_id.setdefault(ident, []).append(f)
    picked = [(f, i) for i in ("id01", "id02", "id05") for f in sorted(by_id[i])[:2]]
    labels = tmp_path_factory.mktemp("tiny") / "labels.csv"
    labels.write_text("file,identity\n" + "".join(f"{f},{i}\n" for f, i in picked))
    return celebs, labels


def test_load_dataset_from_labels_and_subfolders(tiny, tmp_path):
    celebs, labels = tiny
    photos = load_dataset(celebs, labels)
    assert len(photos) == 6 and {p.identity for p in photos} == {"id01", "id02", "id05"}
    (tmp_path / "alice").mkdir()
    (tmp_path / "alice" / "a.jpg").write_bytes(b"x")
    assert [p.identity for p in load_dataset(tmp_path)] == ["alice"]
    with pytest.raises(ValueError, match="no labelled photos"):
        load_dataset(tmp_path / "alice")


@pytest.mark.slow
def test_evaluate_command_end_to_end(tiny, tmp_path):
    celebs, labels = tiny
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["evaluate", str(celebs), "--labels", str(labels), "--out", str(out),
                                 "--models", "sface", "--steps", "3", "--steps", "1", "--max-side", "256",
                                 "--no-transfer", "--graders", "arcface-mobilenet"])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "evaluation.json").read_text())
    assert report["photos"] == 6 and report["gallery"] == 3 and report["probes"] == 3
    # Clean: every probe is identified and verified against its own gallery photo.
    assert report["before"]["sface"]["rank1"] == 1.0 and report["before"]["sface"]["match_rate"] == 1.0
    after = report["white_box"]["protection"]["none"]["sface"]
    assert 0.0 <= after["rank1"] <= 1.0 and len(after["clean_vs_cloaked_cosine"]) == 3
    # Even 3 steps lower the similarity of each cloaked photo to its clean self.
    assert max(after["clean_vs_cloaked_cosine"]) < 0.99
    assert set(report["white_box"]["protection"]) == {"none", "jpeg75", "downscale0.5", "blur1", "half+jpeg75"}
    assert 0.0 <= after["match_rate_shipped"] <= 1.0 and report["before"]["sface"]["match_rate_shipped"] == 1.0
    # The unseen grader is measured but not attacked (before and after, per platform transform).
    assert list(report["unseen"]["protection"]["none"]) == ["arcface-mobilenet"]
    assert set(report["unseen"]["protection"]) == set(report["white_box"]["protection"])
    assert 0.0 <= report["before"]["arcface-mobilenet"]["match_rate_shipped"] <= 1.0
    assert "arcface-mobilenet" not in report["white_box"]["protection"]["none"]
    q = report["white_box"]["quality"]
    assert 0 < q["lpips_alex"]["mean"] < 0.5 and q["psnr"]["min"] > 20
    face = q["face"]["crop224"]
    assert face["psnr"]["n"] == 3 and face["psnr"]["worst"] <= face["psnr"]["median"]
    assert 0 < face["ciede2000_mean"]["mean"] < face["ciede2000_p99"]["mean"]
    assert len(report["sweep"]) == 1 and report["sweep"][0]["steps"] == 1
    md = (out / "evaluation.md").read_text()
    assert "White-box" in md and "| sface |" in md
    assert "Image quality on the faces" in md and "never saw" in md and "shipped operating point" in md
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front_and_the_plot_grey_out_dominated_points(tmp_path):
    import numpy as np
    from PIL import Image

    from lowkey_jax.evaluate import pareto_front, scatter_plot

    pts = [{"x": 1.0, "y": 0.5}, {"x": 2.0, "y": 0.9}, {"x": 2.0, "y": 0.8}, {"x": 0.5, "y": 0.5}, {"x": 3.0, "y": 0.9}]
    # (1.0, 0.5) ties with (0.5, 0.5) on y and loses on x; (2.0, 0.8) loses to (2.0, 0.9); (3.0, 0.9) too
    assert pareto_front(pts, x="x", y="y") == [False, True, False, True, False]
    labelled = [{**p, "label": "front" if f else ""} for p, f in zip(pts, pareto_front(pts, x="x", y="y"))]
    scatter_plot(labelled, tmp_path / "p.png", x="x", y="y", xlabel="x", ylabel="y")
    im = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    w, h, pad = 760, 520, 70
    xmax = 3.0 * 1.15
    at = lambda p: im[round(h - pad - (h - pad - 20) * p["y"]), round(pad + (w - pad - 20) * p["x"] / xmax)]
    assert tuple(at(pts[1])) == (31, 119, 180) and tuple(at(pts[3])) == (31, 119, 180)  # front: blue
    assert tuple(at(pts[2])) == (170, 170, 170) and tuple(at(pts[4])) == (170, 170, 170)  # dominated: grey
