"""README.md's benchmark and evaluation tables are exactly what the committed JSON renders to."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "bench" / "readme_tables.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_tables_match_the_committed_json(tables):
    readme = (ROOT / "README.md").read_text()
    for name in tables.BLOCKS:
        assert f"<!-- BEGIN: {name} " in readme and f"<!-- END: {name} -->" in readme, f"README lacks block {name}"
    assert tables.render_readme(readme) == readme, "README tables are stale: run python bench/readme_tables.py"
    assert tables.main(["--check"]) == 0


def test_a_changed_number_makes_the_check_fail(tables, tmp_path):
    data = json.loads(tables.BENCH_JSON.read_text())
    changed = copy.deepcopy(data)
    attack = next(r for r in changed["rows"] if r["job"] == "attack")
    attack["s_per_photo"] = 99.9
    (tmp_path / "benchmarks.json").write_text(json.dumps(changed))
    readme = (ROOT / "README.md").read_text()
    new = tables.render_readme(readme, {"benchmarks-attack": tmp_path / "benchmarks.json"})
    assert new != readme and "| 99.9 s |" in new
    # The same for the evaluation: FaceNet's match rate after cloaking.
    ev = json.loads(tables.EVAL_JSON.read_text())
    ev["white_box"]["protection"]["none"]["facenet"]["match_rate"] = 0.5
    (tmp_path / "evaluation.json").write_text(json.dumps(ev))
    new = tables.render_readme(readme, {"evaluation": tmp_path / "evaluation.json"})
    assert "| FaceNet | 0.94 -> 0.02 | 0.90 -> 0.50 |" in new
    # --check reports a stale README with a diff and exit status 1.
    stale = tmp_path / "README.md"
    stale.write_text(readme.replace("| 13.3 s |", "| 12.0 s |"))
    assert tables.main(["--check", "--readme", str(stale)]) == 1


def test_missing_fields_and_markers_are_clear_errors(tables, tmp_path):
    data = json.loads(tables.BENCH_JSON.read_text())
    del next(r for r in data["rows"] if r["job"] == "attack")["matmul_peak_gflops"]
    with pytest.raises(tables.TableError, match="benchmarks.json: missing field matmul_peak_gflops"):
        tables.render_attack(data, tables.BENCH_JSON)
    with pytest.raises(tables.TableError, match="unknown generated block"):
        tables.render_readme("<!-- BEGIN: nope -->\n<!-- END: nope -->\n")
    with pytest.raises(tables.TableError, match="no matching"):
        tables.render_readme("<!-- BEGIN: benchmarks -->\nno end\n")


def test_bench_rows_round_trip_the_markdown_they_were_transcribed_from(tables):
    """docs/benchmarks.json was transcribed from docs/benchmarks.md: every number agrees."""
    md = (ROOT / "docs" / "benchmarks.md").read_text()
    data = json.loads(tables.BENCH_JSON.read_text())
    for r in data["rows"]:
        line = next(ln for ln in md.splitlines() if ln.startswith(f"- {r['what']}:"))
        for k, v in r.items():
            if k in ("job", "what"):
                continue
            if isinstance(v, (int, float)):  # bench.py prints floats with 3 significant digits
                assert f"{k} {v}" in line or f"{k} {float(v):.3g}" in line, (k, v, line)
