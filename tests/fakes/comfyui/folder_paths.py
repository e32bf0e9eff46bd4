"""Fake folder_paths: ComfyUI's folder registry under one base folder (``set_base`` in tests)."""

import os

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
folder_names_and_paths = {}
base_path = models_dir = output_directory = input_directory = temp_directory = user_directory = ""


def set_base(path):
    """Lay out a fresh ComfyUI base folder (models/, input/, output/, temp/, user/) at ``path``."""
    global base_path, models_dir, output_directory, input_directory, temp_directory, user_directory
    base_path = str(path)
    models_dir = os.path.join(base_path, "models")
    output_directory = os.path.join(base_path, "output")
    input_directory = os.path.join(base_path, "input")
    temp_directory = os.path.join(base_path, "temp")
    user_directory = os.path.join(base_path, "user")
    folder_names_and_paths.clear()
    folder_names_and_paths["checkpoints"] = (
        [os.path.join(models_dir, "checkpoints")],
        supported_pt_extensions,
    )
    folder_names_and_paths["diffusers"] = ([os.path.join(models_dir, "diffusers")], ["folder"])
    for d in (
        *[p for ps, _ in folder_names_and_paths.values() for p in ps],
        output_directory,
        input_directory,
        temp_directory,
        user_directory,
    ):
        os.makedirs(d, exist_ok=True)


def get_output_directory():
    return output_directory


def get_input_directory():
    return input_directory


def get_temp_directory():
    return temp_directory


def get_user_directory():
    return user_directory


def get_folder_paths(folder_name):
    return folder_names_and_paths[folder_name][0][:]


def get_filename_list(folder_name):
    paths, exts = folder_names_and_paths[folder_name]
    out = []
    for root in paths:
        for dirpath, _dirs, files in os.walk(root, followlinks=True):
            for f in files:
                if os.path.splitext(f)[1].lower() in exts:
                    out.append(os.path.relpath(os.path.join(dirpath, f), root).replace(os.sep, "/"))
    return sorted(out)


def get_full_path(folder_name, filename):
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for root in folder_names_and_paths[folder_name][0]:
        full = os.path.join(root, filename)
        if os.path.isfile(full):
            return full
    return None


def get_full_path_or_raise(folder_name, filename):
    full = get_full_path(folder_name, filename)
    if full is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full
