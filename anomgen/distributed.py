"""What the processes of one multi-process (DDP) run must agree on.

A stage that learns a small set of vectors (a textual-inversion concept, AnomalyDiffusion's embeddings) trains them
as a submodule, so that the strategy averages their gradients over the ranks: every rank then holds the same
vectors, and rank 0 writes the one file. :func:`check_ranks_agree` checks that at the end of fitting, so that a
strategy that did not synchronise them is an error rather than a file of rank 0's vectors alone.
"""

from __future__ import annotations

import torch


def check_ranks_agree(module, tensor: torch.Tensor, what: str, atol: float = 1e-6) -> None:
    """On a run of several processes, gather ``tensor`` from every rank of ``module``'s trainer (a LightningModule
    attached to one) and raise ``RuntimeError`` naming ``what`` when any rank's differs from rank 0's. Nothing on one
    process."""
    if module.trainer.world_size <= 1:
        return
    gathered = module.all_gather(tensor.detach().to(module.device))
    if not torch.allclose(gathered, gathered[:1].expand_as(gathered), atol=atol):
        raise RuntimeError(f"the ranks learned different {what}: their gradients were not synchronised by the "
                           "strategy (train them as a submodule of the LightningModule)")
