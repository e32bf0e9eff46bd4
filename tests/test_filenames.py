"""User-typed file names (ComfyUI's Save node, the Gradio tab) stay inside their folder."""

import os

import pytest

from apdm_core.errors import InputError
from apdm_core.fileio import child_path


def test_names_and_sub_folders_inside_the_folder(tmp_path):
    assert child_path(tmp_path, "alice") == tmp_path.resolve() / "alice"
    assert (
        child_path(tmp_path, "protected/alice", ".safetensors")
        == tmp_path.resolve() / "protected/alice.safetensors"
    )
    assert child_path(tmp_path, "x.SafeTensors", ".safetensors").name == "x.SafeTensors"
    assert child_path(tmp_path, " a\\b ").relative_to(tmp_path.resolve()).as_posix() == "a/b"


@pytest.mark.parametrize(
    "name",
    ["", "  ", "../x", "a/../../x", "/etc/passwd", "C:\\x", "c:x", ".hidden", "a/.git/x", "a\x00b", "a|b"],
)
def test_escapes_and_odd_names_are_refused(tmp_path, name):
    with pytest.raises(InputError, match="not a valid file name"):
        child_path(tmp_path, name)


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", tmp_path / "root" / "link")
    with pytest.raises(InputError, match="outside"):
        child_path(tmp_path / "root", "link/model")
