"""The example workflow (example_workflows/) is current, valid for the nodes' schemas, and has a thumbnail."""

import json

from comfy_host import validate
from comfy_workflow import CORE_NODES, NAME, OUT, build, files, schemas, wires_under_nodes
from PIL import Image


def test_committed_workflows_are_what_the_definition_builds():
    stale = [str(p) for p, text in files().items() if not p.exists() or p.read_text(encoding="utf-8") != text]
    assert not stale, f"regenerate with: python tests/comfy_workflow.py ({stale})"


def test_api_prompt_is_valid_for_every_node():
    specs, _ = schemas()
    prompt = json.loads((OUT / "api" / f"{NAME}.json").read_text(encoding="utf-8"))
    assert {n["class_type"] for n in prompt.values()} >= {"APDMLoadModel", "APDMProtectModel", *CORE_NODES}
    for node_id, node in prompt.items():
        spec, _ = specs[node["class_type"]]
        widgets = {k: v for k, v in node["inputs"].items() if not isinstance(v, list)}
        validate(spec, {**widgets, **{k: None for k, v in node["inputs"].items() if isinstance(v, list)}})
        for name, value in node["inputs"].items():
            if isinstance(value, list):  # a link: the source output's type is the input's type
                src_type = specs[prompt[value[0]]["class_type"]][1][value[1]]
                kind = {**spec["required"], **spec.get("optional", {})}[name][0]
                assert kind in (src_type, "*"), (node_id, name, src_type, kind)


def test_thumbnail_for_the_template_browser():
    with Image.open(OUT / f"{NAME}.jpg") as im:
        assert im.format == "JPEG" and min(im.size) >= 200


def test_the_example_reads_left_to_right_with_no_wire_under_a_node():
    ui, _ = build()
    assert wires_under_nodes(ui) == []
    x = {n["id"]: n["pos"][0] for n in ui["nodes"]}
    for _lid, src, _s, dst, _d, _t in ui["links"]:
        assert x[src] < x[dst], (src, dst)  # every wire runs left to right: pipeline order
