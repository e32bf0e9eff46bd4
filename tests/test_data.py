import warnings

import pytest
from helpers import draw_photo, tree_hashes
from PIL import Image

from apdm_core.data import find_images, load_subject_images
from apdm_core.errors import InputError


def test_loads_folder_sorted_and_resized(subject_dir):
    before = tree_hashes(subject_dir)
    subjects = load_subject_images(subject_dir, 64)
    assert [s.name for s in subjects] == ["img_0", "img_1", "img_2", "img_3"]
    assert all(s.image.size == (64, 64) and s.image.mode == "RGB" for s in subjects)
    assert tree_hashes(subject_dir) == before  # inputs are only read


def test_exif_orientation_and_modes(tmp_path):
    im = Image.new("RGB", (400, 300), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 200, 300))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    Image.new("LA", (300, 300), (128, 255)).save(tmp_path / "gray.png")
    Image.new("RGBA", (300, 300), (0, 255, 0, 128)).save(tmp_path / "alpha.webp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        subjects = {s.name: s.image for s in load_subject_images(tmp_path, 256)}
    rot = subjects["rot"]
    assert rot.mode == "RGB" and rot.size == (256, 256)
    # after orientation the blue half is on top (stored 400x300, displayed 300x400)
    top, bottom = rot.getpixel((128, 10)), rot.getpixel((128, 245))
    assert top[2] > 200 and bottom[0] > 200
    assert subjects["gray"].mode == "RGB" and subjects["alpha"].mode == "RGB"


def test_list_of_files_and_pil_images(subject_dir):
    files = sorted(subject_dir.iterdir())[:3]
    assert len(load_subject_images([str(f) for f in files], 64)) == 3
    pil = load_subject_images([draw_photo(i) for i in range(3)], 64)
    assert [s.name for s in pil] == ["image_000", "image_001", "image_002"]


def test_errors_name_the_file_and_fix(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="broken.png.*re-save"):
        load_subject_images(tmp_path, 64)
    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (100, 120)).save(small / "tiny.png")
    with pytest.raises(InputError, match="tiny.png is too small.*256"):
        load_subject_images(small, 512)
    with pytest.warns(UserWarning):
        assert load_subject_images(small, 64)[0].image.size == (64, 64)  # fine for a 64 px model
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no png/jpg/webp"):
        load_subject_images(empty, 64)
    with pytest.raises(InputError, match="does not exist"):
        find_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="notes.txt is not a png"):
        find_images([tmp_path / "notes.txt"])
    with pytest.raises(InputError, match="No subject images"):
        load_subject_images([], 64)


def test_warns_under_three_images(subject_dir):
    with pytest.warns(UserWarning, match="Only 2"):
        load_subject_images([subject_dir / "img_0.png", subject_dir / "img_1.png"], 64)


def test_class_images_do_not_depend_on_what_the_cache_held(tmp_path, monkeypatch):
    """Generated class images come in index-aligned whole batches: image i is the same whether 3 or 6
    were asked first (on a CPU a batch's other images move a sample), and a cached file is never
    rewritten."""
    from types import SimpleNamespace

    from apdm_core import pairs

    def fake_sample(model, prompt, seeds, size, steps, guidance, batch_size):
        # the pixel depends on the image's seed and on the whole batch, as CPU kernels can
        return [Image.new("RGB", (4, 4), (s % 251, hash(tuple(seeds)) % 251, len(seeds))) for s in seeds]

    monkeypatch.setattr(pairs, "sample_images", fake_sample)
    model = SimpleNamespace(fingerprint=lambda: "m", scheduler=object())

    def ask(cache, count):
        got = pairs.ensure_class_images(model, "a dog", count, size=4, batch_size=4, cache_dir=cache)
        return [im.tobytes() for im in got]

    first = ask(tmp_path / "a", 3)
    folder = next((tmp_path / "a" / "class").iterdir())
    assert len(list(folder.glob("*.png"))) == 4  # the last batch is whole (padded, kept)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    assert ask(tmp_path / "a", 6) == ask(tmp_path / "b", 6) and ask(tmp_path / "a", 6)[:3] == first
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in folder.glob("*.png") if p.name in stamps)
    assert len(list(folder.glob("*.png"))) == 8
