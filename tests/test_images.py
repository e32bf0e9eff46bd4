"""Image-level protection (apdm_core/images/): the budget holds exactly, inputs are untouched, each
method runs on the tiny model and does what it claims, cancel/resume, the robustness transforms, the CLI."""

import numpy as np
import pytest
import torch
from helpers import tree_hashes
from PIL import Image

from apdm_core.data import load_subject_images
from apdm_core.errors import InputError
from apdm_core.images import ImageProtectConfig, image_metrics, protect_images
from apdm_core.images.purify import TRANSFORMS, blur, jpeg, resize
from apdm_core.images.run import quantize


@pytest.fixture()
def image_config(tiny_model_dir, subject_dir, tmp_path):
    def make(**overrides) -> ImageProtectConfig:
        values = dict(model=str(tiny_model_dir), images=[str(subject_dir)], cache_dir=str(tmp_path / "cache"),
                      instance_prompt="a photo of sks dog", class_prompt="a photo of dog", steps=2, surrogate_steps=1,
                      pgd_steps=2, num_class_images=2, sample_steps=2, guidance_scale=2.0, lr=1e-4, device="cpu",
                      save_every=0, denoise_steps=2)  # fmt: skip
        values.update(overrides)
        return ImageProtectConfig(**values)

    return make


def crops(config):
    from apdm_core.loading import load_model

    size = load_model(config.model).native_resolution
    return [s.image for s in load_subject_images(config.images, size, min_side=None if size >= 256 else size)]


def test_budget_parses_fractions_and_refuses_nonsense():
    assert ImageProtectConfig(budget="8/255").budget == pytest.approx(8 / 255)
    assert ImageProtectConfig(budget="8.9/255").budget_levels == 8  # never above the budget
    for bad in ("8/0", "lots", 1.5, 0.0):
        with pytest.raises(InputError, match="budget"):
            ImageProtectConfig(budget=bad)


def test_quantize_never_exceeds_the_budget():
    rng = np.random.default_rng(0)
    orig = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    wild = torch.from_numpy(rng.uniform(-1, 1, (1, 3, 16, 16))).float()  # far outside any budget
    (out,) = quantize(wild, [orig], 5)
    delta = np.asarray(out, np.int16) - np.asarray(orig, np.int16)
    assert np.abs(delta).max() == 5


@pytest.mark.parametrize("method", ["aspl", "ldu"])
def test_each_method_stays_within_the_budget_and_leaves_the_inputs(image_config, subject_dir, tiny_model_dir,
                                                                    tmp_path, method):  # fmt: skip
    before = tree_hashes(subject_dir, tiny_model_dir)
    config = image_config(method=method, budget="4/255", output=str(tmp_path / "out"))
    result = protect_images(config)
    assert not result.cancelled and result.steps_done == 2 and len(result.history) == 2
    # its cost, what the efficacy benchmark reports (all threads: may exceed the wall clock)
    assert 0 < result.cpu_seconds
    assert tree_hashes(subject_dir, tiny_model_dir) == before  # inputs untouched
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert names == sorted(f"{p.stem}.png" for p in subject_dir.glob("*.png"))  # same names, PNG
    for orig, path in zip(crops(config), sorted((tmp_path / "out").glob("*.png"))):
        delta = np.abs(np.asarray(Image.open(path), np.int16) - np.asarray(orig, np.int16))
        assert 0 < delta.max() <= 4  # changed, within 4/255 exactly
    assert all(m["max_change"] <= 4 and m["psnr"] > 30 for m in result.metrics)
    assert (tmp_path / "out" / "apdm_images.json").exists()
    with pytest.raises(InputError, match="already exists"):
        protect_images(config)
    with pytest.raises(InputError, match="inside the input"):
        protect_images(image_config(method=method, output=str(subject_dir / "protected")))


def test_aspl_raises_the_surrogate_loss_on_its_photos(image_config):
    """PGD steps ascend the surrogate's denoising loss: the loss at the protected photos, for fixed
    noise, is above the loss at the originals."""
    from apdm_core.images.base import encode
    from apdm_core.loading import load_model
    from apdm_core.losses import noise_prediction_loss
    from apdm_core.models import pil_to_tensor
    from apdm_core.training import Diffusion, make_forward

    config = image_config(method="aspl", steps=3, pgd_steps=4, budget="16/255", prior_weight=0.0)
    model = load_model(config.model)
    result = protect_images(config, model=model)
    embeds = model.encode_prompts([config.instance_prompt])
    diffusion, forward = Diffusion(model.noise_scheduler()), make_forward(torch.device("cpu"))

    def loss(images):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            z = encode(model, pil_to_tensor(images)).repeat(8, 1, 1, 1)
            batch = diffusion.noisy(z, embeds, g)
            return float(noise_prediction_loss(forward(model.unet, batch), batch.target))

    assert loss(result.images) > loss(crops(config))


def test_ldu_multiplier_grows_while_the_budget_is_violated(image_config):
    result = protect_images(image_config(method="ldu", steps=4, budget="1/255", dual_lr=5.0))
    lams = [h["lambda"] for h in result.history]
    assert all(h["violation"] > 0 for h in result.history) and lams == sorted(lams) and lams[-1] > 1.0


@pytest.mark.parametrize("method", ["aspl", "ldu"])
def test_cancel_then_resume_equals_an_uninterrupted_run(image_config, tmp_path, method):
    full = protect_images(image_config(method=method, steps=4, state_path=str(tmp_path / "a.pt")))
    events = []
    config = image_config(method=method, steps=4, state_path=str(tmp_path / "b.pt"))
    stopped = protect_images(config, progress=events.append,
                             should_stop=lambda: sum(e.stage == "protect_images" for e in events) >= 2)  # fmt: skip
    assert stopped.cancelled and stopped.steps_done == 2 and (tmp_path / "b.pt").exists()
    with pytest.raises(InputError, match="--resume"):
        protect_images(config)
    resumed = protect_images(config, resume=True)
    assert resumed.steps_done == 4 and not (tmp_path / "b.pt").exists()
    for a, b in zip(full.images, resumed.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_transforms_keep_the_size_and_change_the_pixels(tiny_model_dir):
    from apdm_core.loading import load_model

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(2)]
    for out in (jpeg(images, 75), resize(images, 0.5), blur(images, 1.0)):
        assert [im.size for im in out] == [(32, 32)] * 2
        assert not np.array_equal(np.asarray(out[0]), np.asarray(images[0]))
    model = load_model(tiny_model_dir)
    purified = TRANSFORMS["diffpure"][1](model, images, 0)
    assert [im.size for im in purified] == [(32, 32)] * 2
    assert image_metrics(purified, images)[0]["max_change"] > 0


def test_cli_protect_images(image_config, tmp_path, capsys):
    from apdm_core.cli import main

    config = image_config()
    argv = ["protect-images", "--model", config.model, "--images", config.images[0], "--out", str(tmp_path / "o"),
            "--method", "aspl", "--budget", "8/255", "--steps", "1", "--surrogate-steps", "1", "--pgd-steps", "1",
            "--num-class-images", "2", "--sample-steps", "2", "--instance-prompt", "a photo of sks dog",
            "--class-prompt", "a photo of dog", "--cache-dir", config.cache_dir, "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    assert "4 protected photos written to" in capsys.readouterr().out
    assert main(["protect-images", "--images", config.images[0], "--out", str(tmp_path / "p")]) == 2


@pytest.mark.parametrize("method", ["aspl", "ldu"])
def test_the_callers_model_is_left_as_it_was(image_config, method):
    from apdm_core.loading import load_model

    config = image_config(method=method, steps=1)
    model = load_model(config.model)
    model.vae.requires_grad_(True)  # whatever the caller had
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    protect_images(config, model=model)
    assert all(p.requires_grad for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert all(p.grad is None for p in model.vae.parameters())  # no gradient reached the caller's VAE
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())  # ASPL trains a copy
