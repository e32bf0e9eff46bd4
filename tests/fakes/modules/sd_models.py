"""Fake modules.sd_models: a checkpoint list over ``model_path`` and a loaded model that records moves."""

import os


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.name = os.path.basename(filename)
        self.title = f"{self.name} [0123456789]"


class FakeLoadedModel:
    def __init__(self):
        self.device = "cuda"
        self.moves = []

    def move(self, device):
        self.device = device
        self.moves.append(device)


class SdModelData:
    def __init__(self):
        self.sd_model = FakeLoadedModel()


model_path = ""  # the test points it at a folder (A1111: models/Stable-diffusion)
checkpoints_list = {}
model_data = SdModelData()
list_calls = []


def list_models():
    list_calls.append(model_path)
    checkpoints_list.clear()
    for name in sorted(os.listdir(model_path)):
        if name.endswith((".safetensors", ".ckpt")):
            info = CheckpointInfo(os.path.join(model_path, name))
            checkpoints_list[info.title] = info


def checkpoint_tiles(use_short=False):
    return list(checkpoints_list)


def get_closet_checkpoint_match(search_string):
    if search_string in checkpoints_list:
        return checkpoints_list[search_string]
    found = [i for i in checkpoints_list.values() if search_string in i.title]
    return found[0] if found else None


def unload_model_weights(sd_model=None, info=None):
    sd_model.move("cpu")
    return sd_model


def send_model_to_device(m):
    m.move("cuda")
