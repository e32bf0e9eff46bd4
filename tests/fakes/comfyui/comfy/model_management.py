"""Fake comfy.model_management: device, unloading, and the interrupt flag exactly as ComfyUI has it."""

import threading

import torch

calls = []  # names of the memory functions called, for the tests


def get_torch_device():
    return torch.device("cpu")


def load_models_gpu(models, memory_required=0, force_patch_weights=False, **kw):
    calls.append(("load_models_gpu", len(models), force_patch_weights))


def unload_all_models():
    calls.append("unload_all_models")


def soft_empty_cache(force=False):
    calls.append("soft_empty_cache")


class InterruptProcessingException(Exception):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()


def get_total_memory(dev=None, torch_total_too=False):
    import torch

    if getattr(dev, "type", "") == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory
    return 16 * 2**30
