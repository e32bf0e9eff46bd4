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
4. Protect Model (DPO/L2P): the demo preset the README reports (its advanced box holds the rest of
   it); live loss curve and ETA on the node; Cancel keeps the progress, queue again to continue.
5. Sample Images: the protected model still generates the class normally.
6. Test Personalization: the same DreamBooth attack on the base and the protected model;
   grid + metrics here, the full report in ComfyUI/output/apdm_reports/.
7. Save Protected Checkpoint: a checkpoint loaded from models/checkpoints is saved there as
   .safetensors (Load Checkpoint finds it); the demo model is saved as a diffusers folder in
   models/diffusers. An existing file is never replaced unless overwrite is on.

The Reroute lanes above the graph carry the base model and the subject photos to the columns
that use them. For a real SD1.5 checkpoint use the robust preset's settings at lr 5e-6 and
prompts such as 'a photo of person' / 'a photo of sks person'. See the README, section ComfyUI.

SDXL: pick the SDXL checkpoint in Load Model (model_type auto; sdxl-v for a v-prediction fine-tune
without a marker), Generate Pairs resolution 1024 (or 0 = native), and in Protect Model's advanced
box 'preset: sdxl-24gb' on a 24 GB GPU (an estimate; its efficacy is not measured). Save Protected
Checkpoint keeps the SDXL layout; see the README, section SDXL."""


def protect_widgets() -> dict:
    """Protect Model's widgets running the demo world's preset (the one the README reports: efficacy.
    PROTECT_SETTINGS); what has no widget goes into its advanced box, one YAML line."""
    import yaml

    from apdm_core.world.efficacy import PROTECT_SETTINGS

    settings = dict(PROTECT_SETTINGS)
    widgets = {"instance_prompt": "a photo of sks ball", "steps": settings.pop("outer_steps"),
               "inner_steps": settings.pop("inner_steps"), "beta": settings.pop("beta", 1.0),
               "learning_rate": settings.pop("lr_protect"), "accumulation": settings.pop("accumulation", "protect"),
               "method": "apdm", "backdoor": "target", "target_prompt": "", "preset": "auto"}  # fmt: skip
    if settings.get("lr_personalize") == widgets["learning_rate"]:
        settings.pop("lr_personalize")  # the node's learning_rate sets both
    for key in ("num_class_images", "sample_steps", "guidance_scale", "sample_batch_size", "save_every"):
        settings.pop(key, None)  # Generate Pairs' settings, or the host's
    text = yaml.safe_dump(settings, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return {**widgets, "advanced": text[1:-1]}  # 'a: b, c: d' (the box takes one line without braces)


PROTECT_WIDGETS = protect_widgets()

# id, type, title, pos, size, widget values by name, links {input: (source id, output slot)}. One row in
# pipeline order, left to right: a node feeds the next column directly; what travels further runs on Reroute
# lanes above the row (one reroute in each gap it crosses), so no wire runs under a node
# (tests/test_comfy_workflow.py checks it with the frontend's bezier wires).
WIDTHS = [330, 300, 330, 300, 360, 330, 330, 330, 300, 330, 420]
GAP = 140
C = [30]  # column x
for _w in WIDTHS[:-1]:
    C.append(C[-1] + _w + GAP)
LANES = {"model": -80, "subject": -150, "pairs": -220, "protected": -290}  # the reroute lanes' y


def lane(name: str, source: tuple[int, int], first: int, last: int, base_id: int) -> list[tuple]:
    """Reroute nodes for ``name`` in the gaps before columns first..last, fed from ``source``."""
    nodes, src = [], source
    for k, col in enumerate(range(first, last + 1)):
        node_id = base_id + k
        nodes.append((node_id, "Reroute", "", (C[col] - GAP + 20, LANES[name]), (75, 26), {}, {"": src}))
        src = (node_id, 0)
    return nodes


REROUTES = [  # (a value, the reroutes in the gaps before these columns)
    *lane("model", (1, 0), 1, 9, 101),  # 101..109: the gap before column k is 100 + k
    *lane("subject", (2, 0), 1, 9, 201),  # 201..209
    *lane("pairs", (3, 0), 3, 4, 303),  # 303..304
    *lane("protected", (4, 0), 5, 9, 405),  # 405..409
]
GRAPH = [
    (1, "APDMLoadModel", "Load Model for Protection", (C[0], 60), (330, 80), {"ckpt_name": DEMO_MODEL, "model_type": "auto"}, {}),
    (2, "APDMLoadSubjectImages", "Load Subject Images", (C[0], 200), (330, 80), {"folder": DEMO_SUBJECT}, {}),
    (7, "PreviewImage", "Subject photos", (C[1], 60), (300, 300), {}, {"images": (2, 1)}),
    (3, "APDMGeneratePairs", "Generate Pairs", (C[2], 60), (330, 230),
     {"class_prompt": "a photo of ball", "seed": 0, "resolution": 0, "num_class_images": 50, "sample_steps": 25,
      "guidance_scale": 4.0}, {"model": (102, 0), "subject": (202, 0)}),
    (8, "PreviewImage", "Positives (class images)", (C[3], 60), (300, 300), {}, {"images": (3, 1)}),
    (4, "APDMProtectModel", "Protect Model (DPO/L2P)", (C[4], 60), (360, 470), PROTECT_WIDGETS,
     {"model": (104, 0), "subject": (204, 0), "pairs": (304, 0)}),
    (9, "PreviewImage", "Loss curve", (C[5], 60), (330, 280), {}, {"images": (4, 1)}),
    (15, "APDMSaveProtectedCheckpoint", "Save Protected Checkpoint", (C[6], 60), (330, 110),
     {"filename": "apdm/protected_demo", "overwrite": False}, {"protected_model": (406, 0)}),
    (5, "APDMSampleImages", "Sample Images (protected)", (C[7], 60), (330, 310),
     {"prompt": "a photo of ball", "negative_prompt": "", "seed": 0, "count": 4, "steps": 25, "guidance_scale": 4.0,
      "resolution": 0}, {"model": (407, 0)}),
    (10, "PreviewImage", "Protected model samples", (C[8], 60), (300, 290), {}, {"images": (5, 0)}),
    (12, "APDMTestPersonalization", "Test Personalization", (C[9], 60), (330, 320),
     {"attack": "dreambooth", "instance_prompt": "a photo of sks ball", "class_prompt": "a photo of ball", "steps": 400,
      "learning_rate": 5e-4, "num_samples": 16, "seed": 0,
      "advanced": "batch_size: 2, num_class_images: 50, sample_steps: 25, guidance_scale: 4.0, eval_steps: 25, "
                  "eval_guidance: 4.0, random_crop: false, metrics: [world, denoise], "
                  "utility_prompts: ['a photo of {cls}', 'a photo of box'], utility_samples: 16"},
     {"base_model": (109, 0), "protected_model": (409, 0), "subject": (209, 0)}),
    (13, "PreviewImage", "Attack on base vs protected", (C[10], 60), (420, 330), {}, {"images": (12, 0)}),
    (14, "PreviewAny", "Metrics", (C[10], 480), (420, 300), {}, {"source": (12, 1)}),
    *REROUTES,
]  # fmt: skip
NOTE_NODE = (16, "Note", "About this workflow", (C[0], 330), (330, 720))
FRONTEND_NODES = ("Reroute",)  # frontend-only: not in the API prompt (their links go to the source)

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


def source_of(node_id: int, slot: int) -> tuple[int, int]:
    """The node and output a link really comes from (through any Reroute nodes)."""
    while GRAPH_TYPES[node_id] in FRONTEND_NODES:
        node_id, slot = GRAPH_INS[node_id][""]
    return node_id, slot


def build() -> tuple[dict, dict]:
    """(UI-format workflow, API-format prompt)."""
    specs, return_names = schemas()
    links, api, nodes = [], {}, []
    outputs: dict[tuple[int, int], list[int]] = {}

    def out_type(src: int, slot: int) -> str:
        real, real_slot = source_of(src, slot)
        return specs[GRAPH_TYPES[real]][1][real_slot]

    for node_id, _kind, _title, _pos, _size, _w, ins in GRAPH:
        for name, (src, slot) in ins.items():
            links.append([len(links) + 1, src, slot, node_id, name, out_type(src, slot)])
            outputs.setdefault((src, slot), []).append(len(links))
    for order, (node_id, kind, title, pos, size, widgets, ins) in enumerate(GRAPH):
        if kind in FRONTEND_NODES:  # a Reroute: one untyped input, one output of its source's type
            (src, slot), link_in = ins[""], next(lk[0] for lk in links if lk[3] == node_id)
            nodes.append({"id": node_id, "type": kind, "pos": list(pos), "size": list(size), "flags": {},
                          "order": order, "mode": 0, "inputs": [{"name": "", "type": "*", "link": link_in}],
                          "outputs": [{"name": "", "type": out_type(src, slot), "links": outputs.get((node_id, 0), []),
                                       "slot_index": 0}],
                          "properties": {"showOutputText": False, "horizontal": False}})  # fmt: skip
            continue
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
            "inputs": {**widgets, **{n: [str(x) for x in source_of(src, slot)][:1] + [source_of(src, slot)[1]]
                                     for n, (src, slot) in ins.items()}},
            "_meta": {"title": title},
        }  # fmt: skip
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
GRAPH_INS = {g[0]: g[6] for g in GRAPH}
TITLE_H, SLOT_H = 30, 20  # LiteGraph: the title bar above a node's pos, the height of a slot row


def wires_under_nodes(ui: dict) -> list[tuple[int, int]]:
    """(link id, node id) for every wire that runs under a node, as the frontend draws it: a bezier from
    the output slot to the input slot with control points a quarter of the distance out horizontally."""
    nodes = {n["id"]: n for n in ui["nodes"]}

    def slot(node, i, out):
        x, y = node["pos"]
        return (x + node["size"][0] if out else x, y + (i + 0.7) * SLOT_H)

    hits = []
    for lid, src, s_slot, dst, d_slot, _t in ui["links"]:
        (x1, y1), (x2, y2) = slot(nodes[src], s_slot, True), slot(nodes[dst], d_slot, False)
        d = 0.25 * ((x2 - x1) ** 2 + (y2 - y1) ** 2) ** 0.5
        pts = [(x1, y1), (x1 + d, y1), (x2 - d, y2), (x2, y2)]
        for k in range(1, 40):
            t = k / 40
            bx = sum(
                c * p[0] for c, p in zip(((1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t * t * (1 - t), t**3), pts)
            )
            by = sum(
                c * p[1] for c, p in zip(((1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t * t * (1 - t), t**3), pts)
            )
            for nid, n in nodes.items():
                (x, y), (w, h) = n["pos"], n["size"]
                if x + 2 < bx < x + w - 2 and y - TITLE_H + 2 < by < y + h - 2:
                    hits.append((lid, nid))
    return sorted(set(hits))


def _slot_index(specs, node_id: int, name: str) -> int:
    if GRAPH_TYPES[node_id] in FRONTEND_NODES:
        return 0
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
