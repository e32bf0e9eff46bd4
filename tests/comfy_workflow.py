"""The example workflow, defined once: writes example_workflows/*.json (UI format) and the API-format copy.

    python tests/comfy_workflow.py        # regenerate after changing a node's inputs or the graph

tests/test_comfy_workflow.py checks that the committed files equal what this builds and that
every value is valid for the node's INPUT_TYPES. Widget order follows INPUT_TYPES (required,
then optional), with the frontend's extra "control_after_generate" value after a seed (an INT with
control_after_generate=True, or named seed/noise_seed unless it says False).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "example_workflows"
NAME = "apdm_protect_demo"
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")

DEMO_MODEL = "[demo] APDM demo model (built in)"
DEMO_SUBJECT = "[demo] APDM demo subject (built in)"
NOTE = """APDM: protect a model against DreamBooth personalization of one subject.

1. Load Model for Protection: the base checkpoint (here the built-in demo model).
2. Load Subject Images: 4-6 photos of the subject (a folder under ComfyUI/input).
3. Generate Pairs: one generic class image per photo + prior-preservation images (cached).
4. Protect Model (DPO/L2P): live loss curve and ETA on the node; Cancel keeps the progress,
   queue again to continue. Paper settings: 800 steps x 20 inner steps, lr 5e-6.
5. Sample Images: the protected model still generates the class normally.
6. Test Personalization: the same DreamBooth attack on the base and the protected model;
   grid + metrics here, the full report in ComfyUI/output/apdm_reports/.
7. Save Protected Checkpoint: a checkpoint loaded from models/checkpoints is saved there as
   .safetensors (Load Checkpoint finds it); the demo model is saved as a diffusers folder in
   models/diffusers. An existing file is never replaced unless overwrite is on.

For a real SD1.5 checkpoint use the paper settings and class/instance prompts such as
'a photo of person' / 'a photo of sks person'. See the README, section ComfyUI."""

# id, type, title, pos, size, widget values by name, links {input: (source id, output slot)}
GRAPH = [
    (1, "APDMLoadModel", "Load Model for Protection", (30, 60), (330, 80), {"ckpt_name": DEMO_MODEL, "model_type": "auto"}, {}),
    (2, "APDMLoadSubjectImages", "Load Subject Images", (30, 190), (330, 80), {"folder": DEMO_SUBJECT}, {}),
    (3, "APDMGeneratePairs", "Generate Pairs", (400, 60), (330, 250),
     {"class_prompt": "a photo of ball", "seed": 0, "resolution": 0, "num_class_images": 8, "sample_steps": 10,
      "guidance_scale": 3.0}, {"model": (1, 0), "subject": (2, 0)}),
    (4, "APDMProtectModel", "Protect Model (DPO/L2P)", (770, 60), (360, 440),
     {"instance_prompt": "a photo of sks ball", "steps": 20, "inner_steps": 4, "beta": 1.0, "learning_rate": 1e-4,
      "accumulation": "protect", "advanced": "", "method": "apdm", "backdoor": "target", "target_prompt": "", "preset": "auto"},
     {"model": (1, 0), "subject": (2, 0), "pairs": (3, 0)}),
    (5, "APDMSampleImages", "Sample Images (protected)", (1170, 60), (330, 310),
     {"prompt": "a photo of ball", "negative_prompt": "", "seed": 0, "count": 4, "steps": 10, "guidance_scale": 3.0,
      "resolution": 0}, {"model": (4, 0)}),
    (6, "APDMSampleImages", "Sample Images (base)", (1170, 410), (330, 310),
     {"prompt": "a photo of ball", "negative_prompt": "", "seed": 0, "count": 4, "steps": 10, "guidance_scale": 3.0,
      "resolution": 0}, {"model": (1, 0)}),
    (7, "PreviewImage", "Subject photos", (30, 310), (330, 330), {}, {"images": (2, 1)}),
    (8, "PreviewImage", "Positives (class images)", (400, 350), (330, 330), {}, {"images": (3, 1)}),
    (9, "PreviewImage", "Loss curve", (770, 540), (360, 280), {}, {"images": (4, 1)}),
    (10, "PreviewImage", "Protected model samples", (1540, 60), (300, 290), {}, {"images": (5, 0)}),
    (11, "PreviewImage", "Base model samples", (1540, 410), (300, 290), {}, {"images": (6, 0)}),
    (12, "APDMTestPersonalization", "Test Personalization", (1170, 760), (330, 320),
     {"attack": "dreambooth", "instance_prompt": "a photo of sks ball", "class_prompt": "a photo of ball", "steps": 50,
      "learning_rate": 1e-4, "num_samples": 4, "seed": 0,
      "advanced": "num_class_images: 8, sample_steps: 10, guidance_scale: 3.0, eval_steps: 10"},
     {"base_model": (1, 0), "protected_model": (4, 0), "subject": (2, 0)}),
    (13, "PreviewImage", "Attack on base vs protected", (1540, 760), (420, 330), {}, {"images": (12, 0)}),
    (14, "PreviewAny", "Metrics", (1540, 1130), (420, 300), {}, {"source": (12, 1)}),
    (15, "APDMSaveProtectedCheckpoint", "Save Protected Checkpoint", (770, 860), (360, 110),
     {"filename": "apdm/protected_demo", "overwrite": False}, {"protected_model": (4, 0)}),
]  # fmt: skip
NOTE_NODE = (16, "Note", "About this workflow", (30, 690), (700, 250))

CORE_NODES = {  # the ComfyUI nodes the graph uses: INPUT_TYPES and RETURN_TYPES as ComfyUI defines them
    "PreviewImage": ({"required": {"images": ("IMAGE",)}}, ()),
    "PreviewAny": ({"required": {"source": ("*", {})}}, ()),
}


def schemas() -> dict[str, tuple[dict, tuple]]:
    """INPUT_TYPES/RETURN_TYPES of our nodes (loaded against the fake ComfyUI) and the core ones used."""
    from comfy_host import ComfyHost

    with tempfile.TemporaryDirectory() as tmp:
        host = ComfyHost(Path(tmp))
        try:
            found = {k: (cls.INPUT_TYPES(), cls.RETURN_TYPES) for k, cls in host.nodes.items()}
            names = {k: getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES) for k, cls in host.nodes.items()}
        finally:
            host.close()
    names.update({k: v[1] for k, v in CORE_NODES.items()})
    return {**found, **CORE_NODES}, names


def widget_inputs(spec: dict) -> list[tuple[str, tuple]]:
    items = [*spec["required"].items(), *spec.get("optional", {}).items()]
    return [(n, s) for n, s in items if isinstance(s[0], list) or s[0] in WIDGET_TYPES]


def link_inputs(spec: dict) -> list[tuple[str, str]]:
    items = [*spec["required"].items(), *spec.get("optional", {}).items()]
    return [(n, s[0]) for n, s in items if not (isinstance(s[0], list) or s[0] in WIDGET_TYPES)]


def build() -> tuple[dict, dict]:
    """(UI-format workflow, API-format prompt)."""
    specs, return_names = schemas()
    links, api, nodes = [], {}, []
    outputs: dict[tuple[int, int], list[int]] = {}
    for node_id, _kind, _title, _pos, _size, _w, ins in GRAPH:
        for name, (src, slot) in ins.items():
            links.append([len(links) + 1, src, slot, node_id, name, specs[GRAPH_TYPES[src]][1][slot]])
            outputs.setdefault((src, slot), []).append(len(links))
    for order, (node_id, kind, title, pos, size, widgets, ins) in enumerate(GRAPH):
        spec, returns = specs[kind]
        values = []
        for name, s in widget_inputs(spec):
            values.append(widgets[name])
            control = s[1].get("control_after_generate") if len(s) > 1 else None
            if control or (control is None and name in ("seed", "noise_seed")):  # the frontend's rule
                values.append("fixed")
        slots = link_inputs(spec)
        ui_inputs = []
        for name, typ in slots:
            link = next((lk[0] for lk in links if lk[3] == node_id and lk[4] == name), None)
            ui_inputs.append({"name": name, "type": typ, "link": link})
        ui_outputs = [
            {
                "name": return_names[kind][i],
                "type": t,
                "links": outputs.get((node_id, i), []),
                "slot_index": i,
            }
            for i, t in enumerate(returns)
        ]
        nodes.append({"id": node_id, "type": kind, "title": title, "pos": list(pos), "size": list(size), "flags": {},
                      "order": order, "mode": 0, "inputs": ui_inputs, "outputs": ui_outputs,
                      "properties": {"Node name for S&R": kind}, "widgets_values": values})  # fmt: skip
        api[str(node_id)] = {
            "class_type": kind,
            "inputs": {**widgets, **{n: [str(src), slot] for n, (src, slot) in ins.items()}},
            "_meta": {"title": title},
        }
    note_id, note_type, note_title, note_pos, note_size = NOTE_NODE
    nodes.append({"id": note_id, "type": note_type, "title": note_title, "pos": list(note_pos),
                  "size": list(note_size), "flags": {}, "order": len(GRAPH), "mode": 0, "inputs": [], "outputs": [],
                  "properties": {}, "widgets_values": [NOTE]})  # fmt: skip
    ui_links = [
        [lid, src, slot, dst, _slot_index(specs, dst, name), typ] for lid, src, slot, dst, name, typ in links
    ]
    ui = {
        "last_node_id": note_id,
        "last_link_id": len(links),
        "nodes": nodes,
        "links": ui_links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [20, 70]}},
        "version": 0.4,
    }
    return ui, api


GRAPH_TYPES = {g[0]: g[1] for g in GRAPH}


def _slot_index(specs, node_id: int, name: str) -> int:
    return [n for n, _t in link_inputs(specs[GRAPH_TYPES[node_id]][0])].index(name)


def files() -> dict[Path, str]:
    ui, api = build()
    return {
        OUT / f"{NAME}.json": json.dumps(ui, indent=1) + "\n",
        OUT / "api" / f"{NAME}.json": json.dumps(api, indent=1) + "\n",
    }


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    for path, text in files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print("wrote", path)
