"""anomgen.distributed: per-rank training randomness (seed + rank), the device check train.py makes before any
process starts, and the barrier of a pipeline (nothing outside a process group)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from anomgen.distributed import (
    barrier,
    process_rank,
    rank_generator,
    rank_seed,
    requested_devices,
    seed_process,
    trainer_settings,
)
from anomgen.errors import ConfigError


def test_rank_seed_is_seed_plus_rank_and_rank_zero_keeps_the_seed():
    assert [rank_seed(7, r) for r in range(4)] == [7, 8, 9, 10]
    first = rank_generator(7, 0)
    assert torch.equal(torch.rand(5, generator=first), torch.rand(5, generator=torch.Generator().manual_seed(7)))


def test_ranks_draw_differently_and_each_rank_repeatably():
    draws = [torch.randn(100, generator=rank_generator(0, r)) for r in range(4)]
    assert all(not torch.equal(draws[i], draws[j]) for i in range(4) for j in range(i))
    assert torch.equal(draws[2], torch.randn(100, generator=rank_generator(0, 2)))


def test_seed_process_gives_each_rank_its_own_global_draws():
    import random

    import numpy as np

    with torch.random.fork_rng(devices=[]):
        state = np.random.get_state(), random.getstate()
        try:
            draws = []
            for rank in (0, 1, 0):
                assert seed_process(3, rank) == 3 + rank
                draws.append((torch.rand(4), np.random.rand(), random.random()))
        finally:
            np.random.set_state(state[0])
            random.setstate(state[1])
    assert torch.equal(draws[0][0], draws[2][0]) and draws[0][1:] == draws[2][1:]
    assert not torch.equal(draws[0][0], draws[1][0]) and draws[0][1] != draws[1][1] and draws[0][2] != draws[1][2]


def _on_rank(model, rank: int):
    """``model.on_fit_start()`` as rank ``rank`` of a run (a stand-in trainer: only global_rank is read)."""
    model._trainer = SimpleNamespace(global_rank=rank)
    with torch.random.fork_rng(devices=[]):
        model.on_fit_start()
        dropout = torch.rand(8)  # what a dropout mask would be drawn from
    return dropout


def test_sde_model_draws_its_loss_noise_and_dropout_per_rank():
    from anomgen.diffusion import tiny_score_unet
    from models.sde_nearnd import SDENearND

    model = SDENearND(unet=tiny_score_unet("vp", image_size=8, channels=1), sde={"kind": "vp"},
                      optimizer=functools.partial(torch.optim.Adam, lr=1e-3), seed=5)
    seen = {}
    for rank in (0, 1):
        dropout = _on_rank(model, rank)
        seen[rank] = (torch.randn(16, generator=model._noise), dropout)
    assert not torch.equal(seen[0][0], seen[1][0]) and not torch.equal(seen[0][1], seen[1][1])
    assert torch.equal(seen[0][0], torch.randn(16, generator=torch.Generator().manual_seed(5)))


def test_vit_oe_crops_and_flips_per_rank():
    from models.vit_oe import ViTOE

    tiny = {"arch": "vit_small", "image_size": 16, "patch_size": 4, "num_layers": 2, "num_heads": 2,
            "hidden_dim": 16, "mlp_dim": 32}
    model = ViTOE(backbone=tiny, optimizer=None, freeze_blocks=0, seed=0,
                  augment={"kind": "pad_crop", "padding": 3, "flip": True})
    images = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = {}
    for rank in (0, 1, 1):
        _on_rank(model, rank)
        out.setdefault(rank, []).append(model._augment(images))
    assert torch.equal(out[1][0], out[1][1])  # a rank repeats itself
    assert not torch.equal(out[0][0], out[1][0])  # two ranks crop and flip differently


# -- devices ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("devices, n", [(4, 4), ("4", 4), ([0, 2], 2), ("0,1,2", 3), ("auto", None), (-1, None),
                                        (1, 1)])
def test_requested_devices(devices, n):
    assert requested_devices(devices) == n


@pytest.mark.parametrize("trainer, gpus, settings", [
    ({"accelerator": "auto", "devices": 4}, 0, {"strategy": "ddp"}),       # a CPU machine: 4 gloo processes
    ({"accelerator": "cpu", "devices": 4}, 8, {"strategy": "ddp"}),
    ({"accelerator": "auto", "devices": 4}, 4, {"strategy": "ddp"}),       # 4 GPUs: DDP
    ({"accelerator": "gpu", "devices": 4}, 8, {"strategy": "ddp"}),
    ({"accelerator": "gpu", "devices": 2, "strategy": "ddp_spawn"}, 2, {}),  # a chosen strategy is kept
    ({"accelerator": "auto", "devices": 1}, 0, {}),
    ({"accelerator": "auto", "devices": "auto"}, 2, {}),
])
def test_trainer_settings_choose_ddp_for_several_devices(trainer, gpus, settings):
    assert trainer_settings(trainer, gpu_count=gpus) == settings


@pytest.mark.parametrize("trainer, gpus, message", [
    ({"accelerator": "auto", "devices": 4}, 1, r"trainer.devices=4 asks for 4 GPUs, but this machine has 1 .*"
                                               r"trainer.devices=1 or fewer, or trainer.accelerator=cpu"),
    ({"accelerator": "gpu", "devices": 4}, 2, r"asks for 4 GPUs, but this machine has 2"),
    ({"accelerator": "gpu", "devices": 2}, 0, r"has 0 .*: set trainer.accelerator=cpu to run 2 CPU processes"),
])
def test_too_few_gpus_is_one_clear_error(trainer, gpus, message):
    with pytest.raises(ConfigError, match=message):
        trainer_settings(trainer, gpu_count=gpus)


def test_outside_a_process_group_this_is_rank_zero_and_barrier_returns(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert process_rank() == 0
    barrier()
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process a launcher started, before its process group exists
    assert process_rank() == 1


def test_gather_strided_puts_every_rank_s_rows_back_in_sample_order():
    """Sample i made by rank i % world as its row i // world: after the gather every rank holds rows 0..total-1 in
    order, whatever the remainder (the ranks' shares differ by one; padding is dropped)."""
    import torch

    from anomgen.distributed import gather_strided

    for world, total in ((3, 7), (2, 8), (4, 5)):
        rows = torch.arange(total * 2, dtype=torch.float32).reshape(total, 2)
        shares = [rows[rank::world] for rank in range(world)]
        padded = []

        class Strategy:
            world_size = world

            def all_gather(self, tensor):
                padded.append(tensor)
                return torch.stack(padded) if len(padded) == world else None

        strategy = Strategy()
        for rank in range(world - 1):  # the other ranks' sends, then this rank's gather
            padded.append(torch.cat([shares[rank], shares[rank].new_zeros(-(-total // world) - len(shares[rank]), 2)]))
        out = gather_strided(strategy, shares[-1], total)
        torch.testing.assert_close(out, rows, rtol=0, atol=0)
