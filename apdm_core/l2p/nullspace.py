"""The null-space edit: the protection never changes the keys and values of the prompts it must keep.

In a cross-attention layer the text enters only through ``to_k`` and ``to_v``: K = W_k e, V = W_v e
for each token embedding e of the prompt. If every change of W is projected onto the orthogonal
complement of the span of the kept prompts' token embeddings, dW e = 0 for those tokens: their keys
and values stay exactly as they were (SPEED, arXiv 2503.07392, edits concepts this way). The span is
taken up to an energy share (``null_space``, e.g. 0.999 of the singular values' squares), so a
low-energy remainder may still move. The projection is applied to theta's change after each outer
update (AdamW's update is not linear in the gradient, so the gradient is not the place).
"""

from __future__ import annotations

import torch

from ..sdxl import token_states


def kept_basis(embeds: torch.Tensor, energy: float) -> torch.Tensor:
    """(k, D) orthonormal rows spanning ``energy`` of the token embeddings ``embeds`` (..., D)."""
    tokens = embeds.reshape(-1, embeds.shape[-1]).double()
    _, s, vh = torch.linalg.svd(tokens, full_matrices=False)
    share = (s**2).cumsum(0) / (s**2).sum()
    k = int((share < energy).sum()) + 1
    return vh[:k]


class NullSpace:
    """Projects the changes of the cross-attention key/value weights away from the kept prompts' tokens."""

    def __init__(self, unet: torch.nn.Module, embeds: torch.Tensor, energy: float) -> None:
        basis = kept_basis(token_states(embeds, unet), energy)  # SDXL: without the pooled/ids rows
        self.rank = basis.shape[0]
        eye = torch.eye(basis.shape[1], dtype=torch.float64)
        names = (".attn2.to_k.weight", ".attn2.to_v.weight")
        self.params = [p for n, p in unet.named_parameters() if n.endswith(names)]
        self.projection = (eye - basis.T @ basis).to(self.params[0].device, self.params[0].dtype)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def project(self, before: list[torch.Tensor]) -> None:
        """W <- W_before + (W - W_before) P: the change keeps no component along the kept tokens."""
        with torch.no_grad():
            for p, b in zip(self.params, before):
                p.copy_(b + (p - b) @ self.projection)
