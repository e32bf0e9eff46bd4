"""Load Subject Images, Load Model for Protection."""

from __future__ import annotations

from . import host

CATEGORY = "APDM"


class APDMLoadSubjectImages:
    """Photos of the subject to protect: a folder under ComfyUI's input folder, or an IMAGE batch."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": (
                    [host.DEMO_SUBJECT, *host.subject_folders()],
                    {
                        "tooltip": "A folder of 4-6 photos of the subject under ComfyUI's input folder "
                        "(png/jpg/webp), or the built-in demo subject."
                    },
                ),
            },
            "optional": {
                "images": (
                    "IMAGE",
                    {"tooltip": "Use these images instead of the folder (e.g. from Load Image)."},
                ),
            },
        }

    RETURN_TYPES = ("APDM_SUBJECT", "IMAGE")
    RETURN_NAMES = ("subject", "preview")
    OUTPUT_TOOLTIPS = (
        "The subject photos, for Generate Pairs, Protect and Test.",
        "The photos, square-cropped.",
    )
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "The subject whose personalization the protection blocks (a person, a pet, an object)."

    @classmethod
    def IS_CHANGED(cls, folder, images=None):
        return "demo" if folder == host.DEMO_SUBJECT else host.folder_signature(host.subject_folder(folder))

    def load(self, folder, images=None):
        from apdm_core.data import load_subject_images

        if images is not None:
            source = host.from_image_batch(images)
        elif folder == host.DEMO_SUBJECT:
            source = host.demo_subject()
        else:
            source = [str(host.subject_folder(folder))]
        preview = load_subject_images(source, host.PREVIEW_SIZE, min_side=1)  # checks every file now
        return (source, host.to_image_batch([s.image for s in preview]))


class APDMAddSubject:
    """One more subject for the same protection run (chain several): its photos and its prompts."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "subject": ("APDM_SUBJECT", {"tooltip": "The photos of the subject to add (Load Subject Images)."}),
                "instance_prompt": ("STRING", {"default": "a photo of zwx dog", "tooltip": "What an attacker would "
                                               "personalize it with: its own identifier + its class."}),
                "class_prompt": ("STRING", {"default": "a photo of dog", "tooltip": "Its class."}),
            },
            "optional": {
                "subjects": ("APDM_SUBJECTS", {"tooltip": "Subjects added before (chain Add Subject nodes)."}),
            },
        }  # fmt: skip

    RETURN_TYPES = ("APDM_SUBJECTS",)
    RETURN_NAMES = ("subjects",)
    OUTPUT_TOOLTIPS = ("The subjects so far, for Protect Model's more_subjects input.",)
    FUNCTION = "add"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Protect several subjects in one run: each Add Subject adds one; the protection takes them in turn."
    )

    def add(self, subject, instance_prompt, class_prompt, subjects=None):
        return ([*(subjects or []), {"images": subject, "instance_prompt": instance_prompt,
                                     "class_prompt": class_prompt}],)  # fmt: skip


def model_type_input(before: str = ""):
    """The optional model_type input of the model loaders (auto: detected from the tensors)."""
    from apdm_core.checkpoint import MODEL_TYPES

    tooltip = (
        "auto = detected from the tensors; sd2-v = SD2.x 768 v-prediction, sdxl-v = a v-prediction SDXL fine-tune "
        "(set it if detection guesses wrong)."
    )
    return (["auto", *MODEL_TYPES], {"default": "auto", "tooltip": before + tooltip})


class APDMLoadModel:
    """The Stable Diffusion model to protect, as the engine's own model object."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "ckpt_name": (
                    host.model_choices(),
                    {
                        "tooltip": "A checkpoint from models/checkpoints, a diffusers folder from models/diffusers, "
                        "or the built-in demo model."
                    },
                ),
            },
            "optional": {"model_type": model_type_input("Single files: ")},
        }

    RETURN_TYPES = ("APDM_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The base model (full precision, on the CPU until a node needs it).",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a Stable Diffusion 1.x/2.x or SDXL model for Generate Pairs and Protect Model."

    def load(self, ckpt_name, model_type="auto"):
        return (host.load_model(ckpt_name, model_type),)


class APDMModelFromComfy:
    """The model in the graph (Load Checkpoint, with LoRAs or a merge applied) as the engine's model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL to protect (Load Checkpoint, a LoRA loader, a merge)."}),
                "clip": ("CLIP", {"tooltip": "Its CLIP (the text encoder is part of the protected checkpoint)."}),
                "vae": ("VAE", {"tooltip": "Its VAE."}),
            },
            "optional": {
                "model_type": model_type_input(),
                "title": ("STRING", {"default": "", "tooltip": "The model's name in the saved file's title and "
                          "model card (default: 'ComfyUI model')."}),
            },
        }  # fmt: skip

    RETURN_TYPES = ("APDM_MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = (
        "The model, for Generate Pairs and Protect Model (full precision, on the CPU until used).",
    )
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Protect the model of this graph: takes MODEL/CLIP/VAE as ComfyUI's Save Checkpoint would write them "
        "(LoRAs and merges applied). Save Protected Checkpoint writes the result in the same layout; "
        "Protected Model to MODEL/CLIP/VAE applies it to the same MODEL as patches."
    )

    def load(self, model, clip, vae, model_type="auto", title=""):
        return (host.load_graph_model(model, clip, vae, model_type, title.strip() or "ComfyUI model"),)
