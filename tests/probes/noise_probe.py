"""Test-only callback (``+callbacks.probe._target_=noise_probe.NoiseProbe``, with this folder on PYTHONPATH): records
what this rank's score-matching loss drew at the first training step and every step's loss.

The draws are caught at :func:`anomgen.diffusion.sde.rand` / :func:`~anomgen.diffusion.sde.randn`, through which
``dsm_loss`` draws its times ``t`` and noises ``z``, so the record is what the loss used, whatever generator fed it.
Each rank writes ``<path>/rank<global rank>.json`` when fitting ends.
"""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch import Callback


class NoiseProbe(Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.draws: dict[str, list] = {}
        self.losses: list[float] = []
        self._recording = False

    def setup(self, trainer, pl_module, stage: str) -> None:
        from anomgen.diffusion import sde

        def recorded(name, draw):
            def wrapper(*args, **kwargs):
                out = draw(*args, **kwargs)
                if self._recording and name not in self.draws:
                    self.draws[name] = out.detach().flatten()[:16].cpu().tolist()
                return out
            return wrapper

        sde.rand, sde.randn = recorded("t", sde.rand), recorded("z", sde.randn)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._recording = trainer.global_step == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._recording = False
        self.losses.append(float(outputs["loss"]))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "world_size": trainer.world_size, **self.draws, "losses": self.losses}
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
