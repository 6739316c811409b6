"""What the processes of one multi-process (DDP) run share, and what each draws on its own.

- **Agreement.** A stage that learns a small set of vectors (a textual-inversion concept, AnomalyDiffusion's
  embeddings) trains them as a submodule, so that the strategy averages their gradients over the ranks: every rank
  then holds the same vectors, and rank 0 writes the one file. :func:`check_ranks_agree` checks that at the end of
  fitting, so that a strategy that did not synchronise them is an error rather than a file of rank 0's vectors alone.
  Work split over the ranks by index (sample i on rank i mod N, as FID checks do) comes back whole and in order on
  every rank with :func:`gather_strided`.
- **Training randomness differs per rank.** Every process of a run starts from ``seed_everything(cfg.seed)`` with the
  same seed, so without more every rank would draw the same diffusion times, noises, crops, flips and dropout masks at
  every step: N devices would average N copies of one draw. A training module draws from :func:`rank_generator` and
  reseeds the global generators with :func:`seed_process` when fitting starts, both from :func:`rank_seed`
  (``seed + global_rank``: rank 0, and a 1-process run, keep the plain seed). Generated samples are seeded by their
  global index instead (:mod:`anomgen.seeding`), so that a set is the same on 1 device or 4.
- **One process at a time.** :func:`process_rank` and :func:`barrier` let a pipeline run a stage on rank 0 alone
  while the others wait, and make every rank wait until rank 0 has written a stage's records.
- **Devices.** :func:`trainer_settings` checks ``trainer.devices`` against the machine before any process starts.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from datetime import timedelta

import numpy as np
import torch

from anomgen.errors import ConfigError

#: how long a waiting rank waits for rank 0 at :func:`barrier` (a stage that runs on rank 0 alone may take hours; the
#: default collective timeout of 30 minutes would end the waiting ranks first)
WAIT_TIMEOUT = timedelta(days=2)


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


def gather_strided(strategy, local: torch.Tensor, total: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Rows ``0 .. total-1`` of a tensor whose row ``i`` was made by rank ``i % world`` as its local row
    ``i // world`` (samples split strided over the ranks), gathered in order on every rank (on the CPU).

    ``local`` is this rank's ``ceil((total - rank) / world)`` rows; it is padded to ``ceil(total / world)`` rows so
    that every rank sends the same shape, moved to ``device`` for the collective (NCCL gathers GPU tensors), and the
    padding is dropped after reordering. ``strategy`` is a Lightning strategy (``all_gather`` stacks a new first
    dimension of size world)."""
    world = int(strategy.world_size)
    per_rank = -(-int(total) // world)
    padded = local.new_zeros((per_rank, *local.shape[1:]))
    padded[: len(local)] = local
    gathered = strategy.all_gather(padded.to(device)).cpu()  # world × per_rank × ...
    return gathered.transpose(0, 1).reshape(world * per_rank, *local.shape[1:])[: int(total)]


# -- per-rank training randomness -----------------------------------------------------------------------------------


def rank_seed(seed: int, rank: int) -> int:
    """The training seed of process ``rank``: ``seed + rank`` (the convention of every training module; rank 0 and
    a 1-process run keep ``seed``)."""
    return int(seed) + int(rank)


def rank_generator(seed: int, rank: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`rank_seed`: the training draws of one rank."""
    return torch.Generator(device=device).manual_seed(rank_seed(seed, rank))


def seed_process(seed: int, rank: int) -> int:
    """Seed torch's (CPU and every CUDA device), numpy's and Python's global generators with :func:`rank_seed` and
    return it. What draws from the global generators while training (dropout masks above all) then differs per rank;
    ``seed_everything`` alone gives every rank the same state."""
    value = rank_seed(seed, rank)
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
    return value


# -- one process at a time ------------------------------------------------------------------------------------------


def process_rank() -> int:
    """This process's global rank: torch.distributed's once a process group exists, else what the launcher put in the
    environment (``RANK``, or ``LOCAL_RANK`` on one node); 0 for the process the user started."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    for key in ("RANK", "LOCAL_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


_wait_group = None


def barrier() -> None:
    """Wait until every process of the run gets here; nothing outside a process group (one process, or the first
    process before any trainer launched the others). Waits on a gloo group with :data:`WAIT_TIMEOUT`, so that ranks
    waiting for a long stage on rank 0 do not time out (and GPU runs do not hold a CUDA stream for it)."""
    global _wait_group
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if torch.distributed.get_world_size() <= 1:
        return
    if _wait_group is None:  # every rank calls barrier() at the same points, so they create it together
        _wait_group = torch.distributed.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    torch.distributed.barrier(group=_wait_group)


# -- devices --------------------------------------------------------------------------------------------------------


def requested_devices(devices) -> int | None:
    """How many devices ``trainer.devices`` asks for: an int, a digit string, a list of indices or a comma-separated
    string of them; None for ``auto`` / -1 (every device there is)."""
    if isinstance(devices, bool) or devices is None:
        return None
    if isinstance(devices, int):
        return None if devices < 0 else devices
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1", ""):
            return None
        if "," in text:
            return len([d for d in text.split(",") if d.strip()])
        return int(text) if text.isdigit() else None
    try:
        return len(list(devices))
    except TypeError:
        return None


def trainer_settings(trainer: Mapping, gpu_count: int | None = None) -> dict:
    """What ``train.py`` adds to ``trainer`` (its config): ``{"strategy": "ddp"}`` when it asks for more than one
    device and names no strategy (one process per device: NCCL on GPUs, gloo on CPUs), else nothing.

    Raises :class:`ConfigError` naming ``trainer.devices`` and the GPUs found when the accelerator is ``gpu`` /
    ``cuda``, or ``auto`` on a machine with GPUs, and the machine has fewer GPUs than asked for (``auto`` runs CPU
    processes only on a machine with no GPU at all). ``gpu_count``: ``torch.cuda.device_count()`` by default.
    """
    devices = trainer.get("devices", 1)
    n = requested_devices(devices)
    accelerator = str(trainer.get("accelerator") or "auto").lower()
    if accelerator in ("gpu", "cuda", "auto") and n is not None:
        count = torch.cuda.device_count() if gpu_count is None else gpu_count
        if (accelerator != "auto" or count > 0) and n > count:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            where = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
            cpu = f"trainer.accelerator=cpu to run {n} CPU process{'es' if n > 1 else ''}"
            fix = f"set trainer.devices={count} or fewer, or {cpu}" if count else f"set {cpu}"
            raise ConfigError(f"trainer.devices={devices} asks for {n} GPU{'s' if n > 1 else ''}, but this machine "
                              f"has {count}{where} (trainer.accelerator={accelerator}): {fix}")
    if n is not None and n > 1 and trainer.get("strategy") in (None, "auto"):
        return {"strategy": "ddp"}
    return {}
