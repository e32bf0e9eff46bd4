"""Sampling prompts of the evaluation: the paper's for persons, DreamBooth's for pets and objects.

Templates use ``{id}`` (the identifier, e.g. ``sks``) and ``{cls}`` (the class noun).
APDM (Sec. 5.1) samples 15 x "a photo of sks person" and 15 x "a portrait of sks person";
the DreamBooth dataset's evaluation lists are 25 prompts each for live subjects and objects.
"""

from __future__ import annotations

PERSON = ["a photo of {id} {cls}", "a portrait of {id} {cls}"]

_SCENES = [
    "a {id} {cls} in the jungle",
    "a {id} {cls} in the snow",
    "a {id} {cls} on the beach",
    "a {id} {cls} on a cobblestone street",
    "a {id} {cls} on top of pink fabric",
    "a {id} {cls} on top of a wooden floor",
    "a {id} {cls} with a city in the background",
    "a {id} {cls} with a mountain in the background",
    "a {id} {cls} with a blue house in the background",
    "a {id} {cls} on top of a purple rug in a forest",
]
_PROPERTIES = [
    "a red {id} {cls}",
    "a purple {id} {cls}",
    "a shiny {id} {cls}",
    "a wet {id} {cls}",
    "a cube shaped {id} {cls}",
]

LIVE = (
    _SCENES
    + [
        "a {id} {cls} wearing a red hat",
        "a {id} {cls} wearing a santa hat",
        "a {id} {cls} wearing a rainbow scarf",
        "a {id} {cls} wearing a black top hat and a monocle",
        "a {id} {cls} in a chef outfit",
        "a {id} {cls} in a firefighter outfit",
        "a {id} {cls} in a police outfit",
        "a {id} {cls} wearing pink glasses",
        "a {id} {cls} wearing a yellow shirt",
        "a {id} {cls} in a purple wizard outfit",
    ]
    + _PROPERTIES
)

OBJECT = (
    _SCENES
    + [
        "a {id} {cls} with a wheat field in the background",
        "a {id} {cls} with a tree and autumn leaves in the background",
        "a {id} {cls} with the Eiffel Tower in the background",
        "a {id} {cls} floating on top of water",
        "a {id} {cls} floating in an ocean of milk",
        "a {id} {cls} on top of green grass with sunflowers around it",
        "a {id} {cls} on top of a mirror",
        "a {id} {cls} on top of the sidewalk in a crowded street",
        "a {id} {cls} on top of a dirt road",
        "a {id} {cls} on top of a white rug",
    ]
    + _PROPERTIES
)

PROMPT_LISTS = {"person": PERSON, "live": LIVE, "object": OBJECT}

PERSON_NOUNS = {"person", "man", "woman", "boy", "girl", "face", "people", "child", "kid", "lady", "guy"}
LIVE_NOUNS = {"dog", "cat", "puppy", "kitten", "animal", "pet", "bird", "horse", "rabbit", "bear"}


def prompt_set_for(class_noun: str) -> str:
    noun = class_noun.lower().strip()
    if noun in PERSON_NOUNS:
        return "person"
    return "live" if noun in LIVE_NOUNS else "object"


def sample_prompts(
    count: int, identifier: str, class_noun: str, templates: list[str] | None = None, prompt_set: str = "auto"
) -> list[str]:
    """``count`` prompts, the templates in turn (30 person samples -> 15 of each of the paper's two)."""
    if not templates:
        templates = PROMPT_LISTS[prompt_set_for(class_noun) if prompt_set == "auto" else prompt_set]
    return [templates[i % len(templates)].format(id=identifier, cls=class_noun) for i in range(count)]


def without_identifier(prompt: str, identifier: str) -> str:
    """The prompt as plain text (for CLIP): 'a photo of sks person' -> 'a photo of person'."""
    return " ".join(w for w in prompt.split() if w != identifier)
