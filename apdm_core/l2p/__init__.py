"""Learning to Protect: the simulated-attacker loop every model-level method trains with.

- ``trainer``: ``L2PTrainer``, whose ``outer_step`` is the paper's Algorithm 1 (first order);
- ``episode``: the simulated attacker (``Attacker``, one ``Episode`` per trajectory on theta');
- ``placement``: where theta, theta' and the reference live and how gradients reach them (the levers);
- ``data``: what the loop samples from (latent banks, prompts, the anchor), prepared once.
"""

from .data import (
    AnchorSet,
    ProtectionData,
    anchor_set,
    encode_data,
    fixed_images,
    identifier_prompts,
    prepare_data,
    prepare_subjects,
)
from .episode import Attacker, Episode
from .placement import Weights, check_parallel
from .trainer import STATE_VERSION, L2PTrainer

__all__ = [
    "STATE_VERSION",
    "AnchorSet",
    "Attacker",
    "Episode",
    "L2PTrainer",
    "ProtectionData",
    "Weights",
    "check_parallel",
    "encode_data",
    "fixed_images",
    "identifier_prompts",
    "prepare_data",
    "prepare_subjects",
    "anchor_set",
]
