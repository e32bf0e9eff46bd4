"""The CPU proof that protection works: on the demo world, with fixed seeds.

A reduced run of ``benchmarks/efficacy.py``: one subject (8, a ball; not a tuning or a reported
subject), one seed, the demo preset, the standard 400-step attack, scored by the class-gated
similarity (a sample that is not recognisable as the subject's class counts 0). The unprotected
DreamBooth attack must raise it by a clear margin over the base model (the world is one where
personalization works), the same attack on the APDM-protected model must gain at most half as
much, and the protected model must still draw its own class and the other classes (within
CI_MAX_QUALITY_DROP of the unprotected model). Measured on this subject and seed (README, Protection
that holds): gated similarity 0.12 base, 0.88 unprotected + attack, 0.07 protected + attack
(efficiency 0.95); class quality 0.94 -> 0.81 (the earlier `robust` demo preset: 0.38, a strict
xfail then). Takes several minutes on 2 CPU cores.
"""

from __future__ import annotations

import pytest

from apdm_core.world import efficacy

SUBJECT, SEED = 8, 0


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    runner = efficacy.Runner(samples=16, cache_dir=str(tmp_path_factory.mktemp("cache")))
    got = {name: runner.run(efficacy.ROWS[name], SUBJECT, SEED) for name in efficacy.CORE_ROWS}
    for cell in got.values():  # the numbers behind the README's claims, visible with -s
        print(cell)
    return got


def test_unprotected_attack_learns_the_subject(cells):
    base, attacked = cells["base"], cells["base+attack"]
    assert attacked.gated - base.gated > efficacy.CI_MIN_ATTACK_GAIN, (base, attacked)


def test_protected_attack_learns_much_less(cells):
    base, attacked, protected = cells["base"], cells["base+attack"], cells["apdm+attack"]
    gain, protected_gain = attacked.gated - base.gated, protected.gated - base.gated
    assert protected_gain < efficacy.CI_MAX_GAP * gain, (base, attacked, protected)


def test_protection_keeps_other_classes(cells):
    base, protected = cells["base"], cells["apdm+attack"]
    assert protected.unrelated_quality >= base.unrelated_quality - efficacy.CI_MAX_QUALITY_DROP, (
        base,
        protected,
    )


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


def test_summary_efficiency_utility_and_break_even():
    """Efficiency against the from-scratch row, utility on another individual, break-even from a curve."""
    C = efficacy.Cell
    cells = [
        C("base", 1, 0, 0.2, 0.2, 0.9, 0.8, gated=0.2, steps=0),
        C("scratch+attack", 1, 0, 0.3, 0.1, gated=0.1, steps=400),
        C("base+attack", 1, 0, 0.8, 0.8, gated=0.7, steps=400),
        C("base+attack", 1, 0, 0.9, 0.9, gated=0.9, steps=800),
        C("apdm+attack", 1, 0, 0.3, 0.3, 0.85, 0.75, gated=0.25, steps=400),
        C("apdm+attack", 1, 0, 0.8, 0.8, 0.85, 0.75, gated=0.75, steps=800),
        C("base+other_subject", 1, 0, 0.2, 0.2, gated=0.2, steps=0),
        C("base+other_subject", 1, 0, 0.8, 0.8, gated=0.8, steps=400),
        C("apdm+other_subject", 1, 0, 0.2, 0.2, gated=0.2, steps=0),
        C("apdm+other_subject", 1, 0, 0.65, 0.65, gated=0.65, steps=400),
    ]
    rows = {r["row"]: r for r in efficacy.summarize(cells)}
    assert rows["apdm+attack"]["efficiency"] == pytest.approx((0.7 - 0.25) / (0.7 - 0.1))
    assert rows["apdm+attack"]["score"] == pytest.approx(0.25)  # the standard budget's cell, not 800's
    assert rows["apdm+other_subject"]["utility"] == pytest.approx(0.45 / 0.6)
    assert efficacy.break_even(cells, "apdm+attack", 400) == [2.0]  # 0.75 >= 0.7 first at 800 steps
    assert (
        efficacy.twin("apdm+lora", "scratch") == "scratch+lora"
        and efficacy.twin("base+lora", "scratch") is None
    )
    summary = efficacy.curve_summary(cells, "apdm+attack", 400)
    assert summary["break_even_min"] == 2.0 and summary["max_excess_over_scratch_2x"] == pytest.approx(0.15)


def test_gated_similarity_counts_other_classes_as_zero():
    from apdm_core.world import load_evaluator, render

    ev = load_evaluator()
    ball = render.make_subject(8)
    refs = render.photos(ball, 8, start=efficacy.REFERENCE_PHOTOS)
    own = ev.subject_scores(render.photos(ball, 8), refs, ball.cls)
    assert own["gated"] > 0.9 and own["class_rate"] == 1.0
    box = render.make_subject(3)
    assert box.cls != ball.cls
    other = ev.subject_scores(render.photos(box, 8), refs, ball.cls)
    assert other["class_rate"] == 0.0 and other["gated"] == 0.0 and other["similarity"] > 0


def test_frontier_points_and_plot(tmp_path):
    """Efficiency with the quality drop against base on the same subject and seed, per protected row."""
    C = efficacy.Cell
    cells = [
        C("base", 1, 0, 0.2, 0.2, 0.9, 0.8, gated=0.2, steps=0),
        C("scratch+attack", 1, 0, 0.3, 0.1, gated=0.1, steps=400),
        C("base+attack", 1, 0, 0.8, 0.8, gated=0.7, steps=400),
        C("apdm+attack", 1, 0, 0.3, 0.3, 0.6, 0.75, 120.0, 40.0, gated=0.4, steps=400),
        C("apdm+lora", 1, 0, 0.3, 0.3, 0.6, 0.75, 120.0, 40.0, gated=0.4, steps=400),  # not an +attack row
    ]
    (point,) = efficacy.frontier(cells)
    assert point["row"] == "apdm+attack" and point["efficiency"] == pytest.approx(0.5)
    assert point["class_drop"] == pytest.approx(0.3) and point["unrelated_drop"] == pytest.approx(0.05)
    assert point["protect_s"] == 120.0
    out = efficacy.plot_frontier([point, {**point, "row": "other+attack"}], tmp_path / "f.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_method_and_image_rows_and_their_comparison_table():
    aspl = efficacy.make_row("aspl+jpeg75")
    assert aspl.protect is None and aspl.images["method"] == "aspl" and aspl.transform == "jpeg75"
    assert efficacy.unprotected_twin("aspl+jpeg75") == "base+jpeg75"
    pg = efficacy.make_row("persguard_target+identifier")
    assert pg.protect["method"] == "persguard" and pg.attack == {"identifier": "toy"}
    assert efficacy.target_class("kite") == "ball" and efficacy.target_class("ball") == "box"

    def entry(row, score, gap=None, psnr=None):
        e = {"row": row, "score": score, "psnr": psnr, "ssim": 0.9 if psnr else None}
        return {**e, "gap": gap} if gap is not None else e

    summary = [entry("base+attack", 0.7), entry("base+jpeg75", 0.5), entry("aspl+attack", 0.6, 0.8, 31.0),
               entry("aspl+jpeg75", 0.45, 0.9, 31.0), entry("apdm+attack", 0.3, 0.2), entry("apdm+jpeg75", 0.35, 0.4)]  # fmt: skip
    table = efficacy.markdown_comparison(summary).splitlines()
    assert table[0] == "| protection | DreamBooth | photos saved as JPEG 75 | PSNR / SSIM |"
    assert table[2] == "| none (unprotected) | 0.70 | 0.50 |  |"
    assert table[3] == "| aspl | 0.60 (0.80) | 0.45 (0.90) | 31.0 dB / 0.900 |"
    assert table[4] == "| APDM demo preset (model) | 0.30 (0.20) | 0.35 (0.40) |  |"
    assert efficacy.markdown_comparison([entry("base+attack", 0.7)]) == ""


def test_a_method_reports_its_own_success():
    from apdm_core.config import ProtectConfig
    from apdm_core.methods.persguard.loss import stamp_pattern
    from apdm_core.world import render

    class Judge:  # a stand-in for the world's evaluator: answers by the numbers given
        def class_rate(self, samples):
            return 0.25

        def recognised(self, samples, prompt):
            return 1.0 if prompt == "a photo of box" else 0.0

    subject = render.make_subject(1)
    photos = render.photos(subject, 4)
    kw = {"instance_prompt": "a photo of sks ball", "class_prompt": "a photo of ball", "method": "persguard"}
    pattern = ProtectConfig(**kw, backdoor="pattern")
    assert efficacy.method_success(pattern, [stamp_pattern(p) for p in photos], Judge()) == 1.0
    assert efficacy.method_success(pattern, photos, Judge()) == 0.0
    assert efficacy.method_success(ProtectConfig(**kw, backdoor="erasure"), photos, Judge()) == 0.75
    target = ProtectConfig(**kw, backdoor="target", target_prompt="a photo of box")
    assert efficacy.method_success(target, photos, Judge()) == 1.0
    assert efficacy.method_success(ProtectConfig(**{**kw, "method": "apdm"}), photos, Judge()) is None
    assert efficacy.method_success(None, photos, Judge()) is None  # unprotected rows


def test_attacker_photos_one_clean_and_transforms():
    runner = efficacy.Runner(samples=1)
    from apdm_core.world import render

    subject = render.make_subject(1)
    clean = render.photos(subject, 4)
    same = runner.attacker_photos(efficacy.make_row("base+attack"), subject, 0)
    assert [a.tobytes() for a in same] == [b.tobytes() for b in clean]
    jpeg = runner.attacker_photos(efficacy.make_row("base+jpeg75"), subject, 0)
    assert all(a.size == b.size and a.tobytes() != b.tobytes() for a, b in zip(jpeg, clean))
    empty = render.photos(subject, 1, empty=True)[0]  # the erasure backdoor's scene: same background
    assert empty.tobytes() != clean[0].tobytes()


def test_worst_case_over_the_sweep():
    """Per subject and seed: efficiency of every sweep attacker that learns on the unprotected model, the
    standard attack at 2x and 4x, and the worst; attackers that learn nothing are left out."""
    C = efficacy.Cell

    def cells_for(attack, base0, base, scratch, prot, steps=400):
        return [C(f"base+{attack}", 1, 0, 0, 0, gated=base0, steps=0), C(f"base+{attack}", 1, 0, 0, 0, gated=base, steps=steps),
                C(f"scratch+{attack}", 1, 0, 0, 0, gated=scratch, steps=steps),
                C(f"apdm+{attack}", 1, 0, 0, 0, gated=prot, steps=steps)]  # fmt: skip

    cells = (
        cells_for("attack", 0.2, 0.8, 0.1, 0.45)
        + cells_for("attack", 0.2, 0.9, 0.5, 0.8, steps=800)[1:]
        + cells_for("lora", 0.2, 0.6, 0.0, 0.5)
        + cells_for("lr2x", 0.2, 0.25, 0.0, 0.1)  # lr2x learns nothing
        + cells_for("lora16", 0.2, 0.6, 0.55, 0.1)
    )  # fmt: skip  (lora16: as good from scratch: no ratio)
    (entry,) = efficacy.worst_case(cells, "apdm", 400)
    assert entry["standard"] == pytest.approx(0.5) and entry["at_2x"] == pytest.approx(0.25)
    assert entry["efficiency"]["lora"] == pytest.approx(1 / 6) and "lr2x" not in entry["efficiency"]
    assert "lora16" not in entry["efficiency"] and entry["at_4x"] is None
    assert entry["worst_row"] == "lora" and entry["worst"] == pytest.approx(1 / 6)
    table = efficacy.markdown_worst_case([entry])
    assert "| 1, 0 | 0.50 | 0.25 |  | 0.17 | lora | 3 |" in table


def test_the_sweep_expands_the_protected_rows_only():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "eff_bench", Path(__file__).parents[1] / "benchmarks" / "efficacy.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.with_sweep(["base+attack", "apdm+attack"], {}, sweep=True, recovery=True)
    assert rows[:2] == ["base+attack", "apdm+attack"]
    assert {r for r in rows[2:]} == {
        f"apdm+{a}" for a in (*efficacy.SWEEP_ATTACKS, *efficacy.RECOVERY_ATTACKS)
    } - {"apdm+attack"}


def test_attacks_on_the_protection_itself(monkeypatch):
    """Weight round trips change the UNet within their format's precision; a recovery fine-tune trains the
    model on other individuals' photos with the class prompt before the attack."""
    import torch

    from apdm_core.attack.roundtrip import quantize_int8, round_trip
    from apdm_core.world import load_world_model, render

    model = load_world_model()
    for kind, bound in (("fp16", 1e-3), ("int8", 0.02)):
        unet = round_trip(model.unet, kind)
        for (name, a), b in zip(model.unet.named_parameters(), unet.parameters()):
            if a.dim() >= 2 or kind == "fp16":
                assert float((a - b).abs().max()) <= bound * float(a.abs().max()) + 1e-12, (kind, name)
            else:
                assert torch.equal(a, b)  # int8: biases and norms stay
    w = torch.randn(8, 5)
    assert len(torch.unique(quantize_int8(w)[0] / (w[0].abs().max() / 127))) <= 255
    runner = efficacy.Runner(model=model, samples=1)
    subject = render.make_subject(8)
    assert efficacy.make_row("apdm+int8").before == "int8"
    monkeypatch.setattr(efficacy.runner, "RECOVERY_STEPS", 2)
    recovered = runner.before_attack("recover_unrelated", model, subject, 0)
    assert recovered.unet is not model.unet
    assert any(not torch.equal(a, b) for a, b in zip(model.unet.parameters(), recovered.unet.parameters()))


def test_multi_subject_sequential_and_longitudinal_rows(monkeypatch):
    """The runner protects a subject with companions, adds one to a protected model (with replay), and
    the longitudinal attacker learns a companion before the subject (tiny step counts)."""
    from apdm_core.world import render

    fast = {"outer_steps": 2, "inner_steps": 1, "resync_every": 1, "protect_every": 1, "num_class_images": 2,
            "num_anchor_images": 1, "anchor_prompts": []}  # fmt: skip
    runner = efficacy.Runner(
        samples=1, protect_settings=fast, attack_settings={"steps": 2, "num_class_images": 2}
    )
    subject = render.make_subject(8)
    model, _, multi_config = runner.protected(subject, 0, efficacy.make_row("multi2+attack").protect)
    assert [s["instance_prompt"] for s in multi_config.subjects] == [
        "a photo of zwx " + efficacy.companions(1)[0].cls
    ]
    seq, _, seq_config = runner.protected(subject, 0, efficacy.make_row("seqreplay+attack").protect)
    # the second run's primary subject is the added companion; this subject is replayed among the others
    assert (
        seq_config.instance_prompt.split()[-2] == "zwx"
        and seq_config.subjects[0]["instance_prompt"].split()[-2] == "sks"
    )
    for row, same in (("multi5same", True), ("multi5other", False)):  # companions of one class / the others
        settings = {**efficacy.make_row(f"{row}+attack").protect, "outer_steps": 5}
        config = runner.protected(subject, 0, settings)[2]
        assert [s["class_prompt"] == config.class_prompt for s in config.subjects] == [same] * 4
    # protect_seed: the protection's own stream (the config's seed), nothing else changes
    replica_settings = {**efficacy.make_row("multi2+attack").protect, "protect_seed": 7}
    _, _, replica = runner.protected(subject, 0, replica_settings)
    assert replica.seed == 7 and config.seed == 0 and replica.subjects == multi_config.subjects
    # one protection per stream: another attack seed with the same stream reuses the run
    assert runner.protected(subject, 3, replica_settings)[2] is replica
    assert (
        runner.protected(subject, 7, {k: v for k, v in replica_settings.items() if k != "protect_seed"})[2]
        is replica
    )
    learned = runner.before_attack("learn_other", model, subject, 0)
    assert learned.unet is not model.unet
    cells = runner.run_curve("multi2+longitudinal", 8, 0, [0, 2])
    assert [c.steps for c in cells] == [0, 2] and all(c.class_quality is not None for c in cells)


def test_reset_rows_take_only_their_parameters_from_the_random_unet(monkeypatch):
    """reset_<part> rows: the world model with one parameter group from the scratch rows' random UNet
    (the same seed), every other parameter and the given model untouched; the row is unprotected and
    its quality is measured on the reset model, cached apart from the world model's."""
    import torch

    from apdm_core.world import load_world_model, render

    model = load_world_model()
    before = {n: p.clone() for n, p in model.unet.named_parameters()}
    scratch = dict(efficacy.scratch_model(model, 1).unet.named_parameters())
    for name, (_, chosen) in efficacy.RESETS.items():
        row = efficacy.ROWS[f"{name}+attack"]
        assert row.reset == name and row.protect is None and not row.scratch
        reset = dict(efficacy.reset_model(model, 1, name).unet.named_parameters())
        assert any(chosen(n) for n in reset) and any(not chosen(n) for n in reset)
        for n, p in reset.items():
            assert torch.equal(p, scratch[n] if chosen(n) else before[n]), (name, n)
    assert all(torch.equal(p, before[n]) for n, p in model.unet.named_parameters())
    runner = efficacy.Runner(model, samples=1, attack_settings={"steps": 2, "num_class_images": 2})
    seen = []
    monkeypatch.setattr(runner, "quality", lambda m, key, cls, seed: seen.append((m, key)) or {})
    got, _ = runner._model_and_scorer(efficacy.ROWS["reset_kv+attack"], 8, 1)
    cls = render.make_subject(8).cls
    assert got.info["reset"] == "reset_kv" and seen == [(got, ("reset", "reset_kv", cls, 1))]


def best_of_cells() -> list:
    """Two candidate protections of subject 1 (a breaks the class), attack seeds 7 and 0."""
    from apdm_core.world.efficacy import Cell

    def cell(row, seed, steps, score, quality=None):
        return Cell(row, 1, seed, score, 0.0, class_quality=quality, gated=score, steps=steps)

    cells = []
    for seed, (a, b) in ((7, ((0.3, 0.5), (0.6, 0.8))), (0, ((0.7, 0.9), (0.2, 0.3)))):
        cells += [cell("base", seed, 0, 0.2, 0.9), cell("base+attack", seed, 0, 0.2)]
        cells += [cell("base+attack", seed, 400, 0.8), cell("base+attack", seed, 800, 0.9)]
        cells += [cell("scratch+attack", seed, 400, 0.2), cell("scratch+attack", seed, 800, 0.3)]
        for name, (s1, s2), q in (("a+attack", a, 0.5), ("b+attack", b, 0.95)):
            cells += [cell(name, seed, 400, s1, q), cell(name, seed, 800, s2, q)]
    return cells


def test_best_of_chooses_by_one_seed_and_reports_the_others():
    """best_of sees only the selection seed's cells, keeps the class first, and reports the choice under
    the other seeds beside the candidates' mean."""
    import dataclasses

    cells = best_of_cells()
    [pick] = efficacy.best_of(cells, ["a+attack", "b+attack"], 7, 400)
    assert (
        pick["chosen"] == "b+attack" and pick["kept_class"] and pick["report_seeds"] == [0]
    )  # a loses the class
    assert pick["chosen_report"]["efficiency"] == pytest.approx((0.8 - 0.2) / 0.6)  # seed 0's cells, not 7's
    assert pick["average"]["efficiency"] == pytest.approx(((0.8 - 0.7) / 0.6 + 1.0) / 2)
    assert pick["oracle"] == "b+attack" and pick["chosen_report"]["class_quality"] == pytest.approx(0.95)
    assert pick["chosen_report"]["gap_2x"] == pytest.approx(0.9 - 0.3)  # unprotected - protected at 2x
    [pick] = efficacy.best_of(cells, ["a+attack", "b+attack"], 7, 400, class_margin=0.5)
    assert pick["chosen"] == "a+attack"  # the class kept by both: the larger gap at seed 7
    tied = [dataclasses.replace(c, class_quality=0.5) if c.row == "b+attack" else c for c in cells]
    [pick] = efficacy.best_of(tied, ["a+attack", "b+attack"], 7, 400)
    assert pick["chosen"] == "a+attack" and not pick["kept_class"]  # none keeps it; a tie on class: the gap
    [pick] = efficacy.best_of(cells, ["a+attack", "b+attack"], 0, 400, class_margin=0.5)
    assert pick["chosen"] == "b+attack" and pick["report_seeds"] == [7]


def test_benchmark_merge_prints_best_of(tmp_path):
    """benchmarks/efficacy.py --merge ... --best-of prints the choice per subject and the mean."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "cells.json"
    path.write_text(json.dumps({"args": {}, "cells": efficacy.cells_to_dicts(best_of_cells())}))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "efficacy.py"
    out = subprocess.run([sys.executable, str(script), "--merge", str(path), "--best-of", "a+attack", "b+attack"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    line = next(t for t in out.splitlines() if t.startswith("| 1 | b+attack"))
    assert (
        "Best of 2 protection runs, chosen by attack seed 7" in out and "| 0 | 1.00 / 0.58 / 1.00 |" in line
    )


def test_a_soup_variant_averages_the_unets_of_its_protection_streams(monkeypatch):
    """A variant with soup [s1, s2]: the row protected once per protect_seed (the same runs as variants
    pinned to those seeds, cached), then every float tensor of the UNet averaged; the runs are untouched."""
    import types

    import torch

    from apdm_core import protection
    from apdm_core.world import load_world_model, render

    model = load_world_model()
    seeds = []

    def fake_protect(config, *_, model=None, **__):  # a different UNet per stream, fast
        seeds.append(config.seed)
        return types.SimpleNamespace(
            model=efficacy.reset_model(model, config.seed, "reset_kv"), seconds=2.0, cpu_seconds=1.0
        )

    monkeypatch.setattr(protection, "protect", fake_protect)
    runner = efficacy.Runner(model, samples=1)
    subject = render.make_subject(8)
    soup, seconds, _ = runner.protected(subject, 0, {"anchor_weight": 2.0, "soup": [3, 5]})
    a = runner.protected(subject, 0, {"anchor_weight": 2.0, "protect_seed": 3})[0]
    b = runner.protected(subject, 0, {"anchor_weight": 2.0, "protect_seed": 5})[0]
    assert seeds == [3, 5] and seconds == 2.0 and soup.info["soup"] == 2  # the streams ran once each
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    changed = 0
    for name, t in soup.unet.state_dict().items():
        torch.testing.assert_close(t, (sa[name] + sb[name]) / 2)
        changed += not torch.equal(sa[name], sb[name])
    assert (
        changed
        and soup.unet is not a.unet
        and not torch.equal(efficacy.unet_vector(a.unet), efficacy.unet_vector(soup.unet))
    )


def test_a_delta_scale_variant_scales_what_the_protection_changed(monkeypatch):
    """delta_scale s: world model + s x (protected - world model), from the same (cached) protection as the
    row without it; s = 0 gives the world model back, s = 1 the protected one."""
    import types

    import torch

    from apdm_core import protection
    from apdm_core.world import load_world_model, render

    model = load_world_model()
    runs = []

    def fake_protect(config, *_, model=None, **__):
        runs.append(config.seed)
        return types.SimpleNamespace(
            model=efficacy.reset_model(model, config.seed, "reset_kv"), seconds=2.0, cpu_seconds=1.0
        )

    monkeypatch.setattr(protection, "protect", fake_protect)
    runner = efficacy.Runner(model, samples=1)
    subject = render.make_subject(8)
    plain = runner.protected(subject, 0, {"protect_seed": 3})[0]
    scaled, seconds, _ = runner.protected(subject, 0, {"protect_seed": 3, "delta_scale": 1.5})
    back = runner.protected(subject, 0, {"protect_seed": 3, "delta_scale": 0.0})[0]
    assert runs == [3] and seconds == 1.0  # one protection serves them all
    assert runner.protected(subject, 0, {"protect_seed": 3, "delta_scale": 1.5})[0] is scaled  # cached
    base, prot = model.unet.state_dict(), plain.unet.state_dict()
    moved = 0
    for name, t in scaled.unet.state_dict().items():
        if t.is_floating_point():
            torch.testing.assert_close(t, base[name] + 1.5 * (prot[name] - base[name]), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(back.unet.state_dict()[name], base[name])
            moved += not torch.equal(prot[name], base[name])
    assert moved and scaled.unet is not plain.unet and scaled.info["soup"] == [1.5, -0.5]


def test_the_results_cache_keeps_what_other_processes_wrote(tmp_path):
    """Two benchmark processes share one results file: a process's copy from its start must not put back
    (or drop) the cells another wrote since, and a shorter curve keeps the longer one's other budgets."""
    from apdm_core.world.efficacy.cells import Cell, ResultCache

    def cells(*steps, gated=0.5):
        return [Cell("base+attack", 1, 0, 0.5, 0.5, gated=gated, steps=s) for s in steps]

    path = tmp_path / "cache.json"
    a, b = ResultCache(path), ResultCache(path)  # both read the (empty) file at their start
    a.put("k1", cells(0, 400, 800, 1600))
    b.put("k2", cells(0, 400))  # b's copy does not hold k1
    b.put("k1", cells(0, 400, gated=0.7))  # the same attack run, fewer budgets
    fresh = ResultCache(path)
    assert [c.steps for c in fresh.get("k2")] == [0, 400]
    assert [(c.steps, c.gated) for c in fresh.get("k1")] == [(0, 0.7), (400, 0.7), (800, 0.5), (1600, 0.5)]
    assert [c.steps for c in a.get("k2")] == [0, 400]  # a sees b's cells without a restart
    stale = ResultCache(path)  # holds k1 as it is now
    a.put("k1", cells(0, 400, gated=0.9))
    stale.put("k3", cells(0))  # must not put its older k1 back
    assert ResultCache(path).get("k1")[0].gated == 0.9
    stale.put("k4", cells(None))  # a cell of a table before steps were recorded beside a curve
    stale.put("k4", cells(0, 400))
    assert [c.steps for c in ResultCache(path).get("k4")] == [0, 400, None]
