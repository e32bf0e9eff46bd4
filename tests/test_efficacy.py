"""The CPU proof that protection works: on the demo world, with fixed seeds.

A reduced run of ``benchmarks/efficacy.py``: one subject, one seed, the demo preset. The
unprotected DreamBooth attack must raise the subject similarity by a clear margin over the base
model; the same attack on the APDM-protected model must raise it by much less, and the
protected model must still draw the subject's class. Takes a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import pytest

from apdm_core.world import efficacy

SUBJECT, SEED = 3, 0


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    runner = efficacy.Runner(samples=16, cache_dir=str(tmp_path_factory.mktemp("cache")))
    return {name: runner.run(efficacy.ROWS[name], SUBJECT, SEED) for name in efficacy.CORE_ROWS}


def test_unprotected_attack_learns_the_subject(cells):
    base, attacked = cells["base"], cells["base+attack"]
    assert attacked.similarity - base.similarity > efficacy.CI_MIN_ATTACK_GAIN, (base, attacked)


def test_protected_attack_learns_much_less(cells):
    base, attacked, protected = cells["base"], cells["base+attack"], cells["apdm+attack"]
    gain, protected_gain = attacked.similarity - base.similarity, protected.similarity - base.similarity
    assert protected_gain < efficacy.CI_MAX_GAP * gain, (base, attacked, protected)


def test_protection_keeps_the_class(cells):
    base, protected = cells["base"], cells["apdm+attack"]
    assert protected.class_quality >= base.class_quality - efficacy.CI_MAX_QUALITY_DROP, (base, protected)
