"""The --level presets follow the measured sweep (docs/eval/sweep.json, written by
``bench/sweep.py report``): if the sweep changes and the presets do not, this fails."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowkey_jax.presets import DE_TIE, DEFAULT_LEVEL, LEVELS, MAX_UNSEEN_MATCH, default_by_rule, matches, total_match

SWEEP = Path(__file__).resolve().parents[1] / "docs" / "eval" / "sweep.json"


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return json.loads(SWEEP.read_text())["rows"]


def test_the_default_is_the_least_visible_setting_that_protects(rows):
    chosen = default_by_rule(rows)
    assert chosen is not None, "no swept setting meets the protection rule"
    assert chosen["unseen_worst_platform"] <= MAX_UNSEEN_MATCH
    assert DEFAULT_LEVEL == "mid"
    assert matches(LEVELS["mid"], chosen["config"]), (chosen["setting"], LEVELS["mid"])
    # and nothing less visible protects as well: a less visible row fails the unseen
    # recognisers, or is as visible (within DE_TIE) and matched more pairs in all after
    # halving + JPEG 75 (or as many, and more as uploaded)
    for r in rows:
        if r["face_ciede2000_mean"] < chosen["face_ciede2000_mean"] and r["unseen_worst_platform"] <= MAX_UNSEEN_MATCH:
            assert chosen["face_ciede2000_mean"] - r["face_ciede2000_mean"] <= DE_TIE, r["setting"]
            assert (total_match(r), total_match(r, "raw")) > (total_match(chosen), total_match(chosen, "raw")), r["setting"]


def test_the_rule_breaks_ties_in_visibility_by_total_protection():
    """Two protecting settings 0.01 apart in face CIEDE2000: the one all recognisers match
    less wins; 0.2 apart (a visible difference): the less visible one wins."""
    def row(name, de, unseen, per_model):
        return {"setting": name, "face_ciede2000_mean": de, "unseen": ["u"], "unseen_worst_platform": unseen,
                "per_model": {m: {"raw": v, "platform": v} for m, v in per_model.items()}}

    a = row("a", 1.66, 0.04, {"w": 0.10, "u": 0.04})
    b = row("b", 1.67, 0.06, {"w": 0.00, "u": 0.06})
    fails = row("c", 1.20, 0.30, {"w": 0.0, "u": 0.30})
    assert default_by_rule([a, b, fails])["setting"] == "b"
    assert default_by_rule([dict(a, face_ciede2000_mean=1.47), b, fails])["setting"] == "a"
    assert default_by_rule([fails]) is None


def test_every_preset_was_measured_and_they_are_ordered(rows):
    measured = {lv: r for lv in LEVELS for r in rows if matches(LEVELS[lv], r["config"])}
    assert set(measured) == set(LEVELS), sorted(measured)
    dE = {lv: r["face_ciede2000_mean"] for lv, r in measured.items()}
    assert dE["low"] < dE["mid"] < dE["high"] < dE["reference"]  # low subtlest; high less visible than the released
    worst = {lv: r["unseen_worst_platform"] for lv, r in measured.items()}
    assert worst["high"] <= worst["mid"] <= worst["low"]  # and protection in the same order
    assert worst["high"] <= worst["reference"]  # high protects as well as the released setting
    # the report marks each row with the preset it is
    for lv, r in measured.items():
        assert r["preset"] == lv


def test_matches_reads_flags_missing_from_old_rows_as_off():
    assert matches({"epsilon": None, "smooth_chips": False}, {"epsilon": None})
    assert not matches({"smooth_chips": True}, {})
    assert matches({"epsilon": 12 / 255, "chroma": 0.25}, {"epsilon": 0.047058823529411764, "chroma": 0.25, "x": 1})
    assert not matches({"epsilon": None}, {"epsilon": 0.03})


def test_a_row_with_an_extra_option_on_is_not_the_preset(rows):
    low = next(r for r in rows if r["setting"] == "eps10-shaped-jit-lp448-scaled-x2")
    assert matches(LEVELS["low"], low["config"]) and low["preset"] == "low"
    balanced = {**low["config"], "balance": True}
    assert not matches(LEVELS["low"], balanced)
    assert not matches(LEVELS["low"], {**low["config"], "jitter": 0.10})
    assert not matches(LEVELS["low"], {**low["config"], "step_rule": "sign"})
    assert matches(LEVELS["low"], {**low["config"], "models": list(low["config"]["models"]), "seed": 7})


def test_the_default_was_measured_leave_one_out_on_all_five_recognisers():
    """docs/eval/sweep.json's leave-one-out rows for the default: every recogniser held out
    of an attack that is otherwise the default's, at most four models in it."""
    from lowkey_jax.recognizers import RECOGNIZERS

    data = json.loads(SWEEP.read_text())
    rows = data["rows"]
    mid = next(r for r in rows if r.get("preset") == DEFAULT_LEVEL)
    loo = [r for r in data["leave_one_out"] if r["setting"] == mid["setting"]]
    assert sorted(r["held_out"] for r in loo) == sorted(RECOGNIZERS)
    for r in loo:
        assert r["held_out"] not in r["ensemble"] and len(r["ensemble"]) in (3, 4)
        assert 0 <= r["pairs_platform"] <= r["probes"] and abs(r["match_platform"] * r["probes"] - r["pairs_platform"]) < 0.5
        if len(r["ensemble"]) == 3:  # graded from the preset's own run: its models exactly
            assert r["run"] == mid["setting"] and r["ensemble"] == list(mid["config"]["models"])
        else:  # the preset's settings with the other four models
            assert set(r["ensemble"]) == set(RECOGNIZERS) - {r["held_out"]}


def test_held_out_curve_rows_are_four_model_attacks_at_rising_budgets():
    """docs/eval/sweep.json's ``held_out_curve``: the recogniser the default transfers to
    worst, held out of the default's recipe, at several budgets (``bench/sweep.py``)."""
    from lowkey_jax.recognizers import RECOGNIZERS

    curve = json.loads(SWEEP.read_text())["held_out_curve"]
    assert len(curve) >= 2
    budgets = [r["budget"] for r in curve]
    assert budgets == sorted(budgets) and len(set(budgets)) == len(budgets)
    for r in curve:
        assert set(r["ensemble"]) == set(RECOGNIZERS) - {r["held_out"]} and r["held_out"] in RECOGNIZERS
        for t in ("raw", "platform"):
            assert 0 <= r[f"pairs_{t}"] <= r["probes"] and abs(r[f"match_{t}"] * r["probes"] - r[f"pairs_{t}"]) < 0.5
    dE = [r["face_ciede2000_mean"] for r in curve if r["face_ciede2000_mean"] is not None]
    assert len(dE) >= 1 and dE == sorted(dE)  # a larger budget is more visible


def test_describe_names_each_presets_budget_and_lpips_crop():
    """presets.describe: one line per level, from LEVELS itself (no second copy of numbers)."""
    from lowkey_jax.presets import describe

    for name, p in LEVELS.items():
        text = describe(name)
        if p.get("epsilon") is None:
            assert "no budget" in text
            continue
        assert f"budget {round(p['epsilon'] * 255)}/255" in text
        side = p.get("lpips_face_side")
        assert (f"LPIPS on {side}-pixel face crops" in text) == bool(side), text
