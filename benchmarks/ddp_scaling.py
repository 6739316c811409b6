"""DDP scaling of the score-SDE stage: samples per second on 1, 2 and 4 processes, for training steps, for
generation + export and for an FID check, each as a ratio to 1 process. Feeds the table "DDP scaling" of
docs/results/performance.md.

    python benchmarks/ddp_scaling.py                                  # CPU: gloo processes, 1 thread each
    python benchmarks/ddp_scaling.py --accelerator gpu                # one process per GPU (NCCL)
    python benchmarks/ddp_scaling.py --doc docs/results/performance.md   # also rewrite its table
    python benchmarks/ddp_scaling.py --tiny --processes 1 2           # seconds: does it run at all

Each process count runs in a fresh process of this script (``--worker``), which starts a Lightning ``Trainer`` with
``strategy="ddp"`` on that many devices, as ``train.py model=sde_nearnd trainer.devices=N`` does, on
``model=sde_nearnd``'s default network (8×8 grey digits, VP SDE):

- **training**: ``--steps`` optimizer steps at ``--batch-size`` images per process (weak scaling: N processes see
  N × batch images a step); samples/s counts every process's images over the steps after ``--warmup``;
- **generation + export**: ``--num-generated`` samples (``--sampling-steps`` predictor-corrector steps each), split
  over the processes by the export's sampler, written as shards and merged by rank 0 (strong scaling: a fixed set);
  samples/s is that number over the wall time of ``Trainer.predict``, the merge included;
- **FID check**: one check of FID early stopping (``FIDEarlyStopping.measure``) on ``--num-generated`` samples, split
  over the processes (sample i on rank i mod N) with the features gathered; samples/s is that number over the wall
  time of the check (the real images' statistics are computed before, untimed).

Process start-up and imports are not timed. The ratio to 1 process is the figure to read: on a GPU machine, how far
from N× DDP gets; on a CPU, where the processes share the cores (``--threads`` each), it measures the overhead of
the gloo processes (their all-reduce, the shards and the merge) rather than a speed-up. One JSON object per
process count and kind on stdout (name, processes, samples_per_s, ratio, device), then the table.

``--doc PAGE`` rewrites the page's block ``<!-- begin: ddp_scaling -->`` ... ``<!-- end: ddp_scaling -->``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KINDS = ("training", "generation", "fid_check")


# -- the worker: one Trainer on N devices -------------------------------------------------------------------------


def _worker(args) -> None:
    import torch
    from lightning.pytorch import Callback, Trainer

    sys.path.insert(0, str(ROOT))  # models/, callbacks/, datamodules/: repository folders
    from anomgen.data import Digits
    from anomgen.diffusion import score_unet
    from anomgen.encoders import RawPixels
    from callbacks import FIDEarlyStopping, SyntheticSetExport
    from datamodules import AnomalyDataModule
    from models.sde_nearnd import SDENearND

    torch.set_num_threads(args.threads)

    class Throughput(Callback):
        """Images of every process over the steps after ``warmup`` (rank 0's batches × world size: the distributed
        sampler gives every rank the same number)."""

        def __init__(self, warmup: int) -> None:
            self.warmup, self.images, self.t0, self.seconds = warmup, 0, None, 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step == self.warmup:
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.t0 is not None:
                self.images += len(batch["image"]) * trainer.world_size

        def on_train_end(self, trainer, pl_module) -> None:
            if self.t0 is not None:
                self.seconds = time.perf_counter() - self.t0

    torch.manual_seed(args.seed)
    unet = score_unet("vp", image_size=8, channels=1, block_out_channels=(32, 64), layers_per_block=1,
                      attn_resolutions=(4,), dropout=0.0, norm_num_groups=8, attention_head_dim=16)
    model = SDENearND(unet=unet, sde={"kind": "vp"}, optimizer=functools.partial(torch.optim.Adam, lr=2e-4),
                      warmup_steps=100, num_steps=args.sampling_steps, seed=args.seed)
    # enough passes over the 115 training 3s that no process runs out of batches before --steps
    repeats = 1 + (args.steps * args.batch_size * args.processes) // 100
    dm = AnomalyDataModule(dataset=functools.partial(Digits), normal_class="3", batch_size=args.batch_size,
                           num_generated=args.num_generated, eval_batch_size=args.eval_batch_size,
                           train_repeats=repeats, validation="none")
    throughput = Throughput(args.warmup)
    out = Path(args.out).parent / "set"  # every rank the same folder: each writes its shard there
    export = SyntheticSetExport(str(out), overwrite=True)
    trainer = Trainer(accelerator=args.accelerator, devices=args.processes, strategy="ddp", max_steps=args.steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[throughput, export], limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    t0 = time.perf_counter()
    trainer.predict(model, datamodule=dm, return_predictions=False)
    generation_seconds = time.perf_counter() - t0
    fid = FIDEarlyStopping(RawPixels(), every_n_steps=1, num_samples=args.num_generated,
                           batch_size=args.eval_batch_size, grid_size=0)
    fid._real(trainer)  # the real images' statistics: once per run, not part of a check
    model.eval()
    trainer.strategy.barrier("ddp_scaling:fid")
    t0 = time.perf_counter()
    fid.measure(trainer, model)
    trainer.strategy.barrier("ddp_scaling:fid_done")
    fid_seconds = time.perf_counter() - t0
    if trainer.is_global_zero:
        from anomgen.data.synthetic import SyntheticSet

        result = {"processes": args.processes, "world_size": trainer.world_size,
                  "training": {"samples": throughput.images, "seconds": throughput.seconds},
                  "generation": {"samples": len(SyntheticSet(out)), "seconds": generation_seconds},
                  "fid_check": {"samples": args.num_generated, "seconds": fid_seconds},
                  "device": _device(args.accelerator)}
        Path(args.out).write_text(json.dumps(result))


def _device(accelerator: str) -> str:
    import torch

    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def run_worker(args, processes: int) -> dict:
    """This script as a worker on ``processes`` devices, in a fresh process (Lightning's DDP launcher starts the
    other ranks as copies of its command line); its rank 0's figures."""
    with tempfile.TemporaryDirectory(prefix="ddp_scaling_") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--processes", str(processes),
                   "--out", str(out), "--accelerator", args.accelerator, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch-size", str(args.batch_size),
                   "--num-generated", str(args.num_generated), "--eval-batch-size", str(args.eval_batch_size),
                   "--sampling-steps", str(args.sampling_steps), "--threads", str(args.threads),
                   "--seed", str(args.seed)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
        done = subprocess.run(command, cwd=tmp, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the worker on {processes} processes failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


# -- the report -----------------------------------------------------------------------------------------------------


def results(measured: dict[int, dict]) -> list[dict]:
    """One row per kind and process count: samples/s and the ratio to the smallest process count (1)."""
    rows = []
    base = min(measured)
    for kind in KINDS:
        ref = measured[base][kind]["samples"] / measured[base][kind]["seconds"]
        for processes in sorted(measured):
            figures = measured[processes][kind]
            rate = figures["samples"] / figures["seconds"]
            rows.append({"name": f"ddp_scaling_{kind}", "processes": processes, "samples": figures["samples"],
                         "seconds": figures["seconds"], "samples_per_s": rate, "ratio": rate / ref,
                         "device": measured[processes]["device"]})
    return rows


def markdown(rows: list[dict]) -> str:
    """The table: one row per process count, samples/s and the ratio to 1 process for each kind."""
    from docpage import table

    by = {(r["name"].removeprefix("ddp_scaling_"), r["processes"]): r for r in rows}
    counts = sorted({r["processes"] for r in rows})
    body = []
    for n in counts:
        cells = [str(n)]
        for kind in KINDS:
            r = by[(kind, n)]
            cells += [f"{r['samples_per_s']:.1f}", f"{r['ratio']:.2f}×"]
        body.append(cells)
    return table(["processes", "training samples/s", "ratio to 1", "generation + export samples/s", "ratio to 1",
                  "FID check samples/s", "ratio to 1"], body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--steps", type=int, default=60, help="training steps (the first --warmup are not timed)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="training images per process and step")
    parser.add_argument("--num-generated", type=int, default=128, help="samples generated and exported")
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--sampling-steps", type=int, default=100, help="predictor-corrector steps per sample")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a few steps and samples: checks that it runs")
    parser.add_argument("--doc", default=None, help="a page of docs/results/ whose block this run's table rewrites")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.processes = args.processes[0]
        _worker(args)
        return
    if args.tiny:
        args.steps, args.warmup, args.batch_size = 4, 1, 8
        args.num_generated, args.eval_batch_size, args.sampling_steps = 8, 4, 2
    if args.warmup >= args.steps:
        parser.error("--warmup must be below --steps")
    if 1 not in args.processes:
        parser.error("--processes must include 1: the ratios are to 1 process")
    measured = {n: run_worker(args, n) for n in sorted(set(args.processes))}
    rows = results(measured)
    for row in rows:
        print(json.dumps(row))
    text = markdown(rows)
    print(text)
    if args.doc:
        from docpage import write_doc

        device = rows[0]["device"]
        note = (f"{device}, {args.threads} thread(s) per process; training: {args.steps - args.warmup} timed steps "
                f"of {args.batch_size} images per process; generation: {args.num_generated} samples of "
                f"{args.sampling_steps} PC steps, exported and merged; FID check: the same number of samples, "
                "pixel features gathered over the processes.")
        write_doc(args.doc, "ddp_scaling", "ddp_scaling.py", sys.argv[1:] if argv is None else argv, text, note)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # docpage
    main()
