"""The CPU proof that protection works: on the demo world, with fixed seeds.

A reduced run of ``benchmarks/efficacy.py``: one subject, one seed, the demo preset. The
unprotected DreamBooth attack must raise the subject similarity by a clear margin over the base
model (the world is one where personalization works), and the protected model must still draw
the subject's class. That the same attack on the APDM-protected model gains much less is the
goal, and it is NOT reached yet in this world (README, Demo world: the protected attack keeps
89-115% of the unprotected gain): that test is a strict xfail, so the day protection works here
it fails as XPASS and the marker must go. Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import pytest

from apdm_core.world import efficacy

SUBJECT, SEED = 8, 0


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    runner = efficacy.Runner(samples=16, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return {name: runner.run(efficacy.ROWS[name], SUBJECT, SEED) for name in efficacy.CORE_ROWS}


def test_unprotected_attack_learns_the_subject(cells):
    base, attacked = cells["base"], cells["base+attack"]
    assert attacked.similarity - base.similarity > efficacy.CI_MIN_ATTACK_GAIN, (base, attacked)


@pytest.mark.xfail(
    strict=True, reason="APDM does not yet stop DreamBooth in the demo world (README, Demo world)"
)
def test_protected_attack_learns_much_less(cells):
    base, attacked, protected = cells["base"], cells["base+attack"], cells["apdm+attack"]
    gain, protected_gain = attacked.similarity - base.similarity, protected.similarity - base.similarity
    assert protected_gain < efficacy.CI_MAX_GAP * gain, (base, attacked, protected)


def test_protection_keeps_the_class(cells):
    base, protected = cells["base"], cells["apdm+attack"]
    assert protected.class_quality >= base.class_quality - efficacy.CI_MAX_QUALITY_DROP, (base, protected)


def test_summary_gap_and_quality_of_unprotected_rows():
    """The table's arithmetic on made-up cells (no model run)."""
    cells = [
        efficacy.Cell("base", 1, 0, 0.2, 0.2, 0.9, 0.8),
        efficacy.Cell("base+attack", 1, 0, 0.8, 0.8, 0.1, 0.1),  # quality is the base model's
        efficacy.Cell("apdm+attack", 1, 0, 0.35, 0.3, 0.85, 0.75, 60.0, 40.0),
    ]
    rows = {r["row"]: r for r in efficacy.summarize(cells)}
    assert rows["apdm+attack"]["gap"] == pytest.approx(0.25)
    assert rows["base+attack"]["class_quality"] == 0.9 and "gap" not in rows["base+attack"]
    assert efficacy.unprotected_twin("apdm+lora") == "base+lora"
    assert efficacy.unprotected_twin("dpo_only+attack") == "base+attack"
    assert "| apdm+attack |" in efficacy.markdown_table(efficacy.summarize(cells))
    again = efficacy.cells_from_dicts(efficacy.cells_to_dicts(cells))
    assert again == cells
