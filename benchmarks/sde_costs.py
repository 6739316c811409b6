"""Score-SDE on real digits: the FID curve over training, the cost of a training step and of sampling on this CPU,
and the FID callback's share of training time. Feeds the table "Score-SDE costs and FID curve" of
docs/results/performance.md.

    python benchmarks/sde_costs.py --steps 600 --every 50
    python benchmarks/sde_costs.py --steps 600 --every 50 --doc docs/results/performance.md   # also rewrite its table

Trains model=sde_nearnd's default network (8×8 grey, VP SDE) on the digit class "3" with FID checks every
``--every`` steps (256 samples, 100 PC steps, raw-pixel FID against the training normals) and no stopping, then
prints one JSON object per FID check and a summary with the seconds per training step (without the checks), per
check, and the checks' share of the wall time; the reference FID (held-out normals vs training normals) is printed
for scale.

``--doc PAGE`` rewrites the page's block ``<!-- begin: sde_costs -->`` ... ``<!-- end: ... -->`` with the command,
the FID curve as a table and a line of the costs; the rest of the page is left as it is.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # models/, callbacks/, datamodules/: repository folders

from anomgen.data import Digits  # noqa: E402
from anomgen.diffusion import score_unet  # noqa: E402
from anomgen.encoders import RawPixels  # noqa: E402
from callbacks import FIDEarlyStopping  # noqa: E402
from datamodules import AnomalyDataModule  # noqa: E402
from models.sde_nearnd import SDENearND  # noqa: E402


class StepTimer(Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seconds.append(time.perf_counter() - self._t0)


class TimedFID(FIDEarlyStopping):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.check_seconds: list[float] = []

    def measure(self, trainer, pl_module) -> float:
        t0 = time.perf_counter()
        fid = super().measure(trainer, pl_module)
        self.check_seconds.append(time.perf_counter() - t0)
        return fid


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--normal-class", default="3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-samples", type=int, default=256, help="samples per FID check")
    parser.add_argument("--sampling-steps", type=int, default=100, help="predictor-corrector steps per sample")
    parser.add_argument("--doc", default=None, help="a page of docs/results/ whose block this run's table rewrites")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    unet = score_unet("vp", image_size=8, channels=1, block_out_channels=(32, 64), layers_per_block=1,
                      attn_resolutions=(4,), dropout=0.0, norm_num_groups=8, attention_head_dim=16)
    model = SDENearND(unet=unet, sde={"kind": "vp"}, optimizer=functools.partial(torch.optim.Adam, lr=2e-4),
                      warmup_steps=100, num_steps=args.sampling_steps, seed=args.seed)
    dm = AnomalyDataModule(dataset=functools.partial(Digits), normal_class=args.normal_class, batch_size=64)
    # target_factor only to measure the reference FID; a tiny factor never stops the run
    fid = TimedFID(RawPixels(), every_n_steps=args.every, num_samples=args.num_samples, target_factor=1e-12)
    timer = StepTimer()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[timer, fid],
                      gradient_clip_val=1.0)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    wall = time.perf_counter() - t0
    for (step, value), seconds in zip(fid.curve, fid.check_seconds):
        print(json.dumps({"name": "sde_fid_curve", "step": step, "fid": value, "check_seconds": seconds,
                          "device": "cpu"}))
    check_total = sum(fid.check_seconds)
    step_total = sum(timer.seconds)  # the timer's hook ends before the FID callback's: checks are not in it
    summary = {
        "name": "sde_costs", "steps": args.steps, "every": args.every, "normal_class": args.normal_class,
        "reference_fid_heldout": fid.reference_fid, "train_step_seconds": step_total / args.steps,
        "fid_check_seconds": check_total / max(1, len(fid.check_seconds)),
        "fid_share_of_wall": check_total / wall, "wall_seconds": wall,
        "ratio_check_to_step": (check_total / max(1, len(fid.check_seconds))) / (step_total / args.steps),
        "device": "cpu",
    }
    print(json.dumps(summary))
    if args.doc:
        write_table(args, fid.curve, summary, argv)


def write_table(args, curve: list[tuple[int, float]], summary: dict, argv) -> None:
    import sys

    from docpage import table, write_doc

    def fid(v: float) -> str:
        return f"{v:.1f}" if v >= 10 else f"{v:.2f}"

    body = table(["step", *(str(step) for step, _ in curve)], [["FID", *(fid(v) for _, v in curve)]])
    s = summary
    share = 100 * s["fid_share_of_wall"]
    body += (f"\n\nTraining step {s['train_step_seconds']:.3f} s; one FID check {s['fid_check_seconds']:.0f} s "
             f"({s['ratio_check_to_step']:.0f} training steps' worth); the checks take {share:.0f}% of the wall time "
             f"({s['wall_seconds']:.0f} s for {s['steps']} steps); held-out FID {s['reference_fid_heldout']:.2f}; CPU.")
    note = (f"Digits class \"{args.normal_class}\", VP SDE, FID of {args.num_samples} samples "
            f"({args.sampling_steps} PC steps) in raw-pixel space every {args.every} steps.")
    write_doc(args.doc, "sde_costs", "sde_costs.py", sys.argv[1:] if argv is None else argv, body, note)


if __name__ == "__main__":
    main()
