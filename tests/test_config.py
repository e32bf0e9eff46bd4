import json

import pytest

from apdm_core.config import PRESETS, ProtectConfig
from apdm_core.errors import InputError


def test_defaults_are_the_papers():
    c = ProtectConfig()
    assert (c.optimizer, c.lr_personalize, c.lr_protect) == ("adamw", 5e-6, 5e-6)
    assert (c.outer_steps, c.inner_steps, c.beta, c.prior_weight, c.batch_size) == (800, 20, 1.0, 1.0, 1)
    assert (c.loss, c.accumulation, c.dpo_reduction, c.pair_order) == ("dpo", "protect", "sample", "name")
    assert c.resolution == 0  # the model's native size: 512 px for SD1.5, as in the paper


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_round_trip(tmp_path, suffix):
    c = ProtectConfig(
        model="m", images=["a", "b"], beta=10.0, outer_steps=7, accumulation="protect+personalize"
    )
    path = c.save(tmp_path / f"run{suffix}")
    assert ProtectConfig.load(path) == c
    assert ProtectConfig.from_dict(json.loads(c.to_json())) == c


@pytest.mark.parametrize(
    "field,value",
    [
        ("loss", "l2"),
        ("accumulation", "sum"),
        ("outer_steps", 0),
        ("inner_steps", -1),
        ("lr_protect", 0.0),
        ("lr_personalize", float("nan")),
        ("beta", -1.0),
        ("adam_beta1", 1.0),
        ("resolution", 100),
        ("prior_weight", -0.5),
        ("mixed_precision", "fp8"),
        ("instance_prompt", "  "),
    ],
)
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(InputError, match=field):
        ProtectConfig(**{field: value})


def test_unknown_key_and_bad_file(tmp_path):
    with pytest.raises(InputError, match="lr_protcet"):
        ProtectConfig.from_dict({"lr_protcet": 1e-5})
    bad = tmp_path / "bad.yaml"
    bad.write_text("outer_steps: [1,\n")
    with pytest.raises(InputError, match="bad.yaml"):
        ProtectConfig.load(bad)
    with pytest.raises(InputError, match="missing.json"):
        ProtectConfig.load(tmp_path / "missing.json")


def test_presets():
    ref = ProtectConfig.from_preset("reference", outer_steps=5)
    assert (ref.accumulation, ref.dpo_reduction, ref.pair_order, ref.outer_steps) == (
        "protect+personalize",
        "element",
        "listdir",
        5,
    )
    assert ProtectConfig.from_preset("paper") == ProtectConfig()
    assert set(PRESETS) >= {"paper", "reference", "quick", "thorough"}
    with pytest.raises(InputError, match="nope"):
        ProtectConfig.from_preset("nope")


def test_images_accepts_a_single_folder():
    assert ProtectConfig(images="photos").images == ["photos"]
