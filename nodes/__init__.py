"""ComfyUI nodes (V1 API): thin adapters that collect inputs, call one apdm_core function, wrap the result.

Node ids (the keys below) and input names are a contract with saved workflows: never rename them.
"""

from .images import APDMProtectImages
from .loaders import APDMAddSubject, APDMLoadModel, APDMLoadSubjectImages, APDMModelFromComfy
from .outputs import APDMSampleImages, APDMSaveProtectedCheckpoint, APDMToComfyModel
from .protection import APDMGeneratePairs, APDMProtectModel
from .testing import APDMTestPersonalization

NODE_CLASS_MAPPINGS = {
    "APDMLoadSubjectImages": APDMLoadSubjectImages,
    "APDMLoadModel": APDMLoadModel,
    "APDMGeneratePairs": APDMGeneratePairs,
    "APDMProtectModel": APDMProtectModel,
    "APDMTestPersonalization": APDMTestPersonalization,
    "APDMSaveProtectedCheckpoint": APDMSaveProtectedCheckpoint,
    "APDMToComfyModel": APDMToComfyModel,
    "APDMSampleImages": APDMSampleImages,
    "APDMProtectImages": APDMProtectImages,
    "APDMAddSubject": APDMAddSubject,
    "APDMModelFromComfy": APDMModelFromComfy,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "APDMLoadSubjectImages": "Load Subject Images (APDM)",
    "APDMLoadModel": "Load Model for Protection (APDM)",
    "APDMGeneratePairs": "Generate Pairs (APDM)",
    "APDMProtectModel": "Protect Model (DPO/L2P)",
    "APDMTestPersonalization": "Test Personalization (APDM)",
    "APDMSaveProtectedCheckpoint": "Save Protected Checkpoint (APDM)",
    "APDMToComfyModel": "Protected Model to MODEL/CLIP/VAE (APDM)",
    "APDMSampleImages": "Sample Images (APDM)",
    "APDMProtectImages": "Protect Images (ASPL/LDU)",
    "APDMAddSubject": "Add Subject (APDM)",
    "APDMModelFromComfy": "Model from MODEL/CLIP/VAE (APDM)",
}
