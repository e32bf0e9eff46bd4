"""The protection loop keeps computing what it computed: histories of short protections on the tiny
model against the ones recorded before the loop was split into ``apdm_core/l2p`` (issue: the house,
second pass). Every lever and both methods; the weights were bit-identical when recorded (sha256 on
the machine that split the loop, one torch thread); here the losses must agree to float32 rounding,
so the test holds on any CPU and thread count.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from apdm_core.protection import protect

GOLDEN = json.loads((Path(__file__).parent / "golden_l2p.json").read_text())
VARIANTS = {
    "paper": {},
    "reference": {"accumulation": "protect+personalize", "dpo_reduction": "element", "pair_order": "listdir"},
    "dpo_only": {"inner_steps": 0},
    "naive": {"loss": "naive"},
    "target": {"loss": "target"},
    "robust": {"loss": "target", "resync_every": 2, "protect_every": 2, "protect_layers": "cross_attention",
               "inner_max_grad_norm": 1.0, "anchor_weight": 3.0, "anchor_prompts": ["a photo of cat"],
               "inner_batch_size": 2, "num_anchor_images": 2},
    "levers": {"late_weighting": 0.1, "lr_personalize_max": 4e-4, "extra_identifiers": ["zwx", "toy"],
               "protect_layers": "attention", "resync_every": 3},
    "in_backward": {"optimizer_in_backward": True, "resync_every": 2},
    "offload": {"offload_outer": True},
    "persguard": {"method": "persguard", "backdoor": "target", "target_prompt": "a photo of cat",
                  "num_backdoor_images": 2, "resync_every": 2, "anchor_weight": 1.0, "num_anchor_images": 2},
    "persguard_subject": {"method": "persguard", "backdoor": "erasure", "backdoor_input": "subject",
                          "num_backdoor_images": 2},
}  # fmt: skip


@pytest.mark.parametrize("name", list(VARIANTS))
def test_the_loop_computes_what_it_computed(name, fast_config):
    result = protect(fast_config(**{"outer_steps": 4, "inner_steps": 3, **VARIANTS[name]}))
    got = [{k: v for k, v in e.items() if k != "seconds"} for e in result.history]
    want = GOLDEN[name]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert set(g) == set(w)
        # float32 rounding differs with the thread count (a reduction's order) and 4 steps of Adam carry it
        # on: losses agree to 0.1% of the step's largest loss; implicit_acc counts pairs (or latent
        # elements) and may flip a few of those that sit at zero
        scale = max(abs(v) for v in w.values() if isinstance(v, float))
        for k, v in w.items():
            if k == "implicit_acc":
                assert abs(g[k] - v) <= 0.02, (name, g["step"], k, g[k], v)
            elif isinstance(v, float):
                assert math.isclose(g[k], v, rel_tol=1e-3, abs_tol=1e-3 * scale), (
                    name,
                    g["step"],
                    k,
                    g[k],
                    v,
                )
            else:
                assert g[k] == v, (name, k)
