"""Single-GPU timings at the papers' model sizes, random weights (nothing is downloaded). Feeds "GPU timings at real
model sizes" of docs/results/performance.md (block ``gpu_timings``).

Four parts, each a function (``--parts`` picks; they run in this order):

- ``diffstyle``: a DiffStyle set with guided-diffusion's unconditional ImageNet 256×256 UNet (ADM,
  :func:`anomgen.diffusion.adm.adm_unet_config` at its defaults: 552 M parameters, built on the device): the S style
  and C content images are inverted once, then the S·C anomalies are generated (``--styles 4 --contents 4``, one
  generation batch of 16), on a ``--ddim-steps 10`` grid with the paper's t_edit 400 and t_boost 200, exactly as
  :meth:`anomgen.generators.diffstyle.DiffStyle.cross_product` does it. Reports images/s (inversions included, and
  generation alone), the seconds of one generation DDIM step at the batch, UNet image passes/s. float32, as the
  generator runs.
- ``sde``: score-SDE training steps at the CIFAR-10 size: ``model=sde_ddpmpp`` as ``experiment=fitymi_cifar10``
  composes it (DDPM++ 128 × (1, 2, 2, 2), 2 blocks, attention at 16, dropout 0.1, VP SDE; Adam 2e-4, gradient clip 1,
  EMA 0.999; batch 128, the experiment's), ``models.sde_nearnd.SDENearND`` under a Lightning ``Trainer`` on random
  32 px images; ``--sde-warmup 10`` untimed steps, then ``--sde-steps 60`` timed ones (each between
  ``torch.cuda.synchronize`` calls at the batch's start and end). Reports steps/s and images/s.
- ``pixel``: :class:`anomgen.selection.PixelMetrics` (pixel AUROC, AP, F1-max and AUPRO, as ``evaluate.py`` scores a
  detector's maps) on ``--pixel-images 100`` maps of ``--pixel-size 1024``² (10 per update, the synthetic maps and
  blob masks of ``benchmarks/pixel_metrics_memory.py``), exact (every pixel kept) vs binned (10,000 thresholds over
  (0, 1)). PixelMetrics scores on the host (it moves maps to the CPU), so this part measures the GPU machine's CPU:
  seconds (update + compute, the maps' making apart) and the peak RSS above what was resident before (binned runs
  first, so the exact run's freed gigabytes cannot hide the binned peak).
- ``concept``: ADP concept-learning steps at Stable Diffusion 2.1 size (768 px, with ADP's CLIP term through a random
  ViT-H-14): :func:`benchmarks.concept_speed.main` is called (imported, not copied) with the configurations ``fp32``
  (the baseline), ``fp16`` and ``fp16_ckpt_cached`` (ADP's memory-saving setting) at batch sizes 1 and 4, 2 warm-up
  + 8 timed steps each, and a time budget of what is left of ``--budget-minutes`` (at most ``--concept-minutes``),
  which lowers its timed steps (to no fewer than 3) when its estimate says it would take longer. Its rows come out
  here with ``"part": "concept"``.

Timing: every measurement has warm-up work first (a 1 × 1 DiffStyle set, the SDE's warm-up steps, concept_speed's
warm-up steps) and is bracketed by ``torch.cuda.synchronize``. Memory on the GPU: ``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats`` (weights, optimizer state and EMA included); on a CPU (``--tiny``) the process's peak
RSS over the measurement. Every row records torch, CUDA and cuDNN versions, the device's name and the TF32 flags
(left at torch's defaults, as the project runs).

Expected time of the default run on one H100 / H200-class GPU (an estimate from the models' sizes, not yet
measured): about 5 minutes: DiffStyle about 40 s (build, a 1 × 1 warm-up set, 332 ADM passes at 256 px), the SDE
about 30 s (Lightning's start, 70 steps at batch 128), pixel metrics about 1 to 2 minutes of CPU work, the concept
part up to its budget (build of the SD 2.1 stack and ViT-H-14 on the device, then 6 measurements). ``--budget-minutes``
(default 8) bounds the whole: the concept part, last, gets what is left of it less a minute for its build.

    python benchmarks/gpu_timings.py --results benchmarks/results/gpu_timings.jsonl \\
        --doc docs/results/performance.md                    # one GPU, about 5 minutes
    python benchmarks/gpu_timings.py --parts diffstyle sde    # some parts only
    python benchmarks/gpu_timings.py --tiny                   # every part at toy sizes on the CPU: plumbing

``--tiny`` runs every part at toy sizes (a 32 px ADM-shaped UNet, ``debug=tiny``'s score UNet at batch 4, 4 maps of
64², SD 2.1 at 1/16 width and 64 px) on the CPU (or ``--device cuda --tiny`` on a GPU: a smoke run); its rows have
``"plumbing": true`` and its table says so. Output: one JSON object per measurement on stdout, a summary object, then
the markdown table; ``--results FILE`` appends the JSON rows; ``--doc PAGE`` rewrites the page's block
``<!-- begin: gpu_timings -->`` ... ``<!-- end: gpu_timings -->`` with the command and the table (the rest of the page
is left as it is). A part that fails (e.g. out of memory) gives a row with ``"error"``, the others still run, and the
exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's anomgen and models/ (a repository folder), before any installed copy

import concept_speed  # noqa: E402  (benchmarks/ is on sys.path: it is this script's folder)
from concept_speed import Memory, synchronize  # noqa: E402

PARTS = ("diffstyle", "sde", "pixel", "concept")
NAME = "gpu_timings"

#: --tiny: an ADM-shaped UNet (scale-shift norm, resblock up/down, learned σ) at 32 px
TINY_ADM = dict(image_size=32, num_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
                num_head_channels=32)
#: the concept configurations of the default run: the baseline, half precision alone, ADP's memory-saving setting
CONCEPT_CONFIGS = ("fp32", "fp16", "fp16_ckpt_cached")


def log(message: str) -> None:
    print(f"[{NAME}] {message}", file=sys.stderr, flush=True)


def environment(device: torch.device) -> dict:
    """What every row records about the machine and the stack."""
    cuda = device.type == "cuda"
    threads = torch.get_num_threads()
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else
        f"CPU ({threads} torch thread{'s' if threads > 1 else ''})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------- DiffStyle


def diffstyle_part(args: argparse.Namespace, device: torch.device, memory: Memory) -> list[dict]:
    """A DiffStyle set of ``styles × contents`` anomalies with the ADM-256 UNet (random weights) on ``device``."""
    from diffusers import UNet2DModel

    from anomgen.diffusion.adm import adm_unet_config
    from anomgen.generators.diffstyle import DiffStyle
    from anomgen.seeding import sample_generator

    config = adm_unet_config(**(TINY_ADM if args.tiny else {}))
    size = config["sample_size"]
    memory.reset()
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(args.seed)
        unet = UNet2DModel(**config)  # created and initialised on the device, as load_diffusion_unet's model runs
    unet.eval().requires_grad_(False)
    synchronize(device)
    build_s = time.perf_counter() - t0
    ds = DiffStyle(unet, num_inference_steps=args.ddim_steps)  # the paper's t_edit, t_boost, γ, mix
    try:
        gen = torch.Generator(device=device).manual_seed(args.seed)
        n_styles, n_contents = args.styles, args.contents
        style_images = torch.rand(n_styles, 3, size, size, generator=gen, device=device)
        content_images = torch.rand(n_contents, 3, size, size, generator=gen, device=device)

        def make_set(styles_in: torch.Tensor, contents_in: torch.Tensor) -> tuple[float, float, int, int]:
            """cross_product's work, timed in two parts: (inversion s, generation s, generation batches, images)."""
            synchronize(device)
            start = time.perf_counter()
            styles = ds.invert(styles_in, keep_h=False)
            contents = ds.invert(contents_in, keep_h=True)
            synchronize(device)
            inverted = time.perf_counter()
            total, batches = len(styles) * len(contents), 0
            for lo in range(0, total, args.diffstyle_batch):
                indices = list(range(lo, min(lo + args.diffstyle_batch, total)))
                generators = [sample_generator(args.seed, i) for i in indices]
                images = ds.generate([styles[i // len(contents)] for i in indices],
                                     [contents[i % len(contents)] for i in indices], generators)
                batches += 1
            synchronize(device)
            if not torch.isfinite(images).all():
                raise FloatingPointError("DiffStyle gave non-finite images")
            return inverted - start, time.perf_counter() - inverted, batches, total

        make_set(style_images[:1], content_images[:1])  # warm-up: kernels, allocator, the h hook
        resident = memory.reset()
        ds.eps.evaluations = 0
        invert_s, generate_s, batches, n_images = make_set(style_images, content_images)
        passes = ds.eps.evaluations
        peak = memory.peak()
        steps = len(ds.schedule.timesteps)
        seconds = invert_s + generate_s
        row = {
            "part": "diffstyle", "measurement": "diffstyle_set",
            "model": "ADM-256 uncond (guided-diffusion)" if not args.tiny else "ADM-shaped UNet, tiny",
            "parameters": _parameters(unet), "resolution": size, "styles": n_styles, "contents": n_contents,
            "images": n_images, "batch_size": args.diffstyle_batch, "ddim_steps": steps, "t_edit": ds.t_edit,
            "t_boost": ds.t_boost, "edited_steps": len(ds._edit_timesteps()), "dtype": "float32",
            "build_s": round(build_s, 3), "invert_s": round(invert_s, 4), "generate_s": round(generate_s, 4),
            "seconds": round(seconds, 4), "images_per_s": round(n_images / seconds, 4),
            "generation_images_per_s": round(n_images / generate_s, 4),
            "seconds_per_generation_step": round(generate_s / (batches * steps), 5), "unet_passes": passes,
            "unet_passes_per_s": round(passes / seconds, 3), "peak_bytes": peak, "resident_bytes": resident,
            "peak_above_resident_bytes": None if peak is None or resident is None else peak - resident,
            "memory_kind": memory.kind,
        }
    finally:
        ds.close()
    return [row]


# ---------------------------------------------------------------------------------------------------- score-SDE


def compose_sde(tiny: bool):
    """``experiment=fitymi_cifar10``'s composed config (``debug=tiny`` with ``--tiny``): its ``model`` is the
    DDPM++-sized ``model=sde_ddpmpp``, its ``datamodule.batch_size`` 128."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from anomgen.pipeline import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    overrides = ["experiment=fitymi_cifar10", *(["debug=tiny"] if tiny else [])]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


class _RandomImages(torch.utils.data.Dataset):
    """``n`` records ``{"image": ...}`` drawn from a fixed pool of random [0, 1] images."""

    def __init__(self, n: int, pool: torch.Tensor) -> None:
        self.n, self.pool = n, pool

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": self.pool[i % len(self.pool)]}


def sde_part(args: argparse.Namespace, device: torch.device, memory: Memory) -> list[dict]:
    """Training steps of ``SDENearND`` at the CIFAR-10 size under a Lightning ``Trainer`` on ``device``."""
    from hydra.utils import instantiate
    from lightning.pytorch import Callback, Trainer

    cfg = compose_sde(args.tiny)
    batch = args.sde_batch or int(cfg.datamodule.batch_size)
    size = int(cfg.image_size)
    warmup, steps = args.sde_warmup, args.sde_steps

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.ends: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            synchronize(device)
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            synchronize(device)
            now = time.perf_counter()
            self.seconds.append(now - self._t0)
            self.ends.append(now)
            if len(self.ends) == warmup:  # the timed loop starts here: data loading between steps counts in it
                self.loop_start = now

    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = instantiate(cfg.model)
        pool = torch.rand(min(4 * batch, 1024), 3, size, size)
    loader = torch.utils.data.DataLoader(_RandomImages(batch * (warmup + steps), pool), batch_size=batch,
                                         drop_last=True)
    timer = StepTimer()
    clip = cfg.trainer.get("gradient_clip_val")
    with tempfile.TemporaryDirectory() as root:
        trainer = Trainer(accelerator="gpu" if device.type == "cuda" else "cpu",
                          devices=[device.index] if device.type == "cuda" else 1, max_steps=warmup + steps,
                          max_epochs=1, gradient_clip_val=clip, precision=cfg.trainer.get("precision", "32-true"),
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, callbacks=[timer],
                          default_root_dir=root)
        resident = memory.reset()
        trainer.fit(model, train_dataloaders=loader)
        peak = memory.peak()
    timed = timer.seconds[warmup:]
    if len(timed) != steps:
        raise RuntimeError(f"the SDE ran {len(timer.seconds)} steps, expected {warmup + steps}")
    loop_s = timer.ends[-1] - timer.loop_start if warmup else None
    row = {
        "part": "sde", "measurement": "sde_training_step",
        "model": "score UNet " + "×".join(map(str, model.unet.config.block_out_channels)) + f", {cfg.model.sde.kind}",
        "config": "experiment=fitymi_cifar10 (model=sde_ddpmpp)" + (" debug=tiny" if args.tiny else ""),
        "parameters": _parameters(model.unet), "resolution": size, "batch_size": batch, "warmup": warmup,
        "steps": steps, "gradient_clip_val": clip, "optimizer": "Adam", "ema_decay": float(cfg.model.ema_decay),
        "precision": str(trainer.precision), "seconds_per_step": round(sum(timed) / len(timed), 5),
        "median_seconds_per_step": round(statistics.median(timed), 5),
        "steps_per_s": round(len(timed) / sum(timed), 4), "images_per_s": round(batch * len(timed) / sum(timed), 2),
        "loop_steps_per_s": round(steps / loop_s, 4) if loop_s else None, "first_step_s": round(timer.seconds[0], 4),
        "final_loss": float(trainer.callback_metrics["train/loss"]) if "train/loss" in trainer.callback_metrics
        else None, "peak_bytes": peak, "resident_bytes": resident,
        "peak_above_resident_bytes": None if peak is None or resident is None else peak - resident,
        "memory_kind": memory.kind,
    }
    return [row]


# ---------------------------------------------------------------------------------------------------- pixel metrics


def pixel_part(args: argparse.Namespace, device: torch.device, memory: Memory) -> list[dict]:
    """PixelMetrics binned and exact on the same maps; seconds and peak RSS of each (always on the host)."""
    from pixel_metrics_memory import _state_bytes

    from anomgen.metrics._synthetic import smooth_maps_and_blob_masks
    from anomgen.metrics.functional import DEFAULT_NUM_THRESHOLDS
    from anomgen.selection import PixelMetrics

    host = Memory(torch.device("cpu"))
    n, size, per_update = args.pixel_images, args.pixel_size, args.pixel_batch
    rows, values = [], {}
    for mode in ("binned", "exact"):
        metrics = (PixelMetrics(num_thresholds=DEFAULT_NUM_THRESHOLDS, score_range=(0.0, 1.0)) if mode == "binned"
                   else PixelMetrics())
        resident = host.reset()
        generate_s = update_s = 0.0
        for start in range(0, n, per_update):
            t0 = time.perf_counter()
            maps, masks = smooth_maps_and_blob_masks(min(per_update, n - start), size, seed=args.seed, start=start)
            batch = {"mask": masks, "mask_path": ["mask.png"] * len(masks),
                     "label": masks.flatten(1).any(1).long()}
            t1 = time.perf_counter()
            metrics.update(maps, batch)
            update_s += time.perf_counter() - t1
            generate_s += t1 - t0
            del maps, masks, batch
        t0 = time.perf_counter()
        values[mode] = metrics.compute()
        compute_s = time.perf_counter() - t0
        peak = host.peak()
        state = _state_bytes(metrics.curve_metric) + _state_bytes(metrics.pro_metric)
        rows.append({
            "part": "pixel", "measurement": f"pixel_metrics_{mode}", "mode": mode, "images": n, "height": size,
            "width": size, "pixels": n * size * size, "per_update": per_update,
            "num_thresholds": metrics.curve_metric.num_thresholds, "metrics": sorted(values[mode]),
            "seconds": round(update_s + compute_s, 3), "update_s": round(update_s, 3),
            "compute_s": round(compute_s, 3), "data_generation_s": round(generate_s, 3), "state_bytes": state,
            "peak_bytes": peak, "resident_bytes": resident,
            "peak_above_resident_bytes": None if peak is None or resident is None else peak - resident,
            "memory_kind": host.kind, "torch_threads": torch.get_num_threads(),
            "on": "host (PixelMetrics uses the CPU)",
            "values": values[mode],
        })
        del metrics
        gc.collect()
    binned, exact = rows
    diffs = {k: abs(values["exact"][k] - values["binned"][k]) for k in values["exact"]}
    for row in rows:
        row["max_abs_diff_exact_binned"] = max(diffs.values())
    if exact["peak_above_resident_bytes"] and binned["peak_above_resident_bytes"] is not None:
        binned["memory_ratio_to_exact"] = round(binned["peak_above_resident_bytes"] /
                                                exact["peak_above_resident_bytes"], 4)
    binned["time_ratio_to_exact"] = round(binned["seconds"] / exact["seconds"], 4) if exact["seconds"] else None
    return rows


# ---------------------------------------------------------------------------------------------------- concept steps


def concept_argv(args: argparse.Namespace, device: torch.device, budget_minutes: float) -> list[str]:
    """concept_speed.py's command line for this run."""
    if args.tiny:
        sizes = ["--scale", "0.0625", "--resolution", "64", "--batch-sizes", "1", "--warmup", "1", "--steps", "1",
                 "--configs", "fp32", "fp16_ckpt_cached"]
    else:
        sizes = ["--batch-sizes", "1", "4", "--warmup", "2", "--steps", "8", "--configs", *CONCEPT_CONFIGS]
    return ["--device", str(device), *sizes, "--budget-minutes", f"{budget_minutes:.2f}", "--seed", str(args.seed)]


def concept_part(args: argparse.Namespace, device: torch.device, memory: Memory, budget_minutes: float) -> list[dict]:
    """benchmarks/concept_speed.py's measurements (its ``main``, imported), its rows relabelled as this part's."""
    argv = concept_argv(args, device, budget_minutes)
    log("concept: concept_speed.py " + " ".join(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # its JSON rows come back as values, and are printed here as ours
        rows = concept_speed.main(argv)
    summary = rows[-1]
    measured = []
    for r in rows[:-1]:
        row = {"part": "concept", "measurement": f"concept_step_{r['config']}", **r,
               "concept_speed_argv": argv, "build_s": summary["build_s"]}
        row.pop("name", None)
        measured.append(row)
    return measured


# ---------------------------------------------------------------------------------------------------- the run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda; cpu with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="every part at toy sizes (plumbing, not results)")
    parser.add_argument("--budget-minutes", type=float, default=8.0,
                        help="the whole run's budget: the concept part gets what is left of it less a minute")
    parser.add_argument("--concept-minutes", type=float, default=3.0, help="the concept part's budget at most")
    parser.add_argument("--ddim-steps", type=int, default=10, help="DiffStyle's DDIM grid")
    parser.add_argument("--styles", type=int, default=None, help="DiffStyle style images (default 4; tiny 2)")
    parser.add_argument("--contents", type=int, default=None, help="DiffStyle content images (default 4; tiny 2)")
    parser.add_argument("--diffstyle-batch", type=int, default=16, help="pairs per generation batch")
    parser.add_argument("--sde-batch", type=int, default=None, help="default: the experiment's (128; tiny 4)")
    parser.add_argument("--sde-warmup", type=int, default=None, help="untimed SDE steps (default 10; tiny 1)")
    parser.add_argument("--sde-steps", type=int, default=None, help="timed SDE steps (default 60; tiny 3)")
    parser.add_argument("--pixel-images", type=int, default=None, help="default 100 (tiny 4)")
    parser.add_argument("--pixel-size", type=int, default=None, help="default 1024 (tiny 64)")
    parser.add_argument("--pixel-batch", type=int, default=10, help="maps per update")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=None, help="a .jsonl file the rows are appended to")
    parser.add_argument("--doc", default=None, help="a page of docs/results/ whose block this run's table rewrites")
    args = parser.parse_args(argv)
    defaults = {"styles": (4, 2), "contents": (4, 2), "sde_warmup": (10, 1), "sde_steps": (60, 3),
                "pixel_images": (100, 4), "pixel_size": (1024, 64)}
    for key, (full, tiny) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    if min(args.styles, args.contents, args.ddim_steps, args.diffstyle_batch, args.sde_steps, args.pixel_images,
           args.pixel_size, args.pixel_batch) < 1 or args.sde_warmup < 0:
        parser.error("sizes and step counts must be at least 1 (--sde-warmup at least 0)")
    args.parts = [p for p in PARTS if p in args.parts]
    return args


def resolve_device(args: argparse.Namespace) -> torch.device:
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_timings: --device cuda but no CUDA device here; --tiny runs every part at toy sizes "
                             "on the CPU")
        if device.index is None:  # set_device and the memory statistics want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = resolve_device(args)
    env = environment(device)
    memory = Memory(device)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    log(f"plan: parts {', '.join(args.parts)} on {env['device_name']}" + (" at toy sizes (--tiny)" if args.tiny else "")
        + f"; torch {env['torch']}, CUDA {env['cuda']}; budget {args.budget_minutes:g} min")
    t_start = time.perf_counter()
    rows, part_seconds, failed = [], {}, False
    for part in args.parts:
        t0 = time.perf_counter()
        try:
            if part == "concept":
                left = args.budget_minutes - (time.perf_counter() - t_start) / 60 - 1.0
                got = concept_part(args, device, memory, max(0.5, min(args.concept_minutes, left)))
            else:
                got = {"diffstyle": diffstyle_part, "sde": sde_part, "pixel": pixel_part}[part](args, device, memory)
        except Exception as err:  # noqa: BLE001  (one part's failure, e.g. out of memory, is reported; the rest runs)
            failed = True
            message = str(err).splitlines()[0][:300] if str(err) else ""
            got = [{"part": part, "measurement": part, "error": f"{type(err).__name__}: {message}".rstrip(": ")}]
            log(f"{part} failed:\n{traceback.format_exc()}")
        finally:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        part_seconds[part] = round(time.perf_counter() - t0, 2)
        for row in got:
            row = {"name": NAME, **row, "plumbing": args.tiny, "run": run_id, **env}
            print(json.dumps(row), flush=True)
            rows.append(row)
        log(f"{part} done in {part_seconds[part]:.1f} s ({time.perf_counter() - t_start:.0f} s so far)")
    summary = {"name": f"{NAME}_summary", "parts": args.parts, "part_seconds": part_seconds,
               "wall_s": round(time.perf_counter() - t_start, 2), "plumbing": args.tiny, "run": run_id, **env}
    print(json.dumps(summary), flush=True)
    rows.append(summary)
    text = markdown(rows)
    print(text, flush=True)
    if args.results:
        from pipeline_runs import append_rows

        append_rows(Path(args.results), rows)
    if args.doc:
        from docpage import write_doc

        write_doc(args.doc, NAME, "gpu_timings.py", sys.argv[1:] if argv is None else argv, text, note(rows))
    if failed:
        raise SystemExit(1)
    return rows


# ---------------------------------------------------------------------------------------------------- the table


def _millions(n: int) -> str:
    return f"{n / 1e6:.0f} M" if n >= 1e7 else f"{n / 1e6:.2f} M"


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s >= 10 else f"{s:.2f} s" if s >= 0.1 else f"{s:.3f} s"


def markdown(rows: list[dict]) -> str:
    """The table of a run: one line per measurement."""
    from docpage import size, table

    def mem(row: dict, key: str = "peak_bytes") -> str | None:
        return None if row.get(key) is None else size(row[key])

    lines = []
    for r in rows[:-1]:
        if "error" in r:
            lines.append([r["part"], r["measurement"], None, r["error"], None, None])
            continue
        part = r["part"]
        if part == "diffstyle":
            lines.append([
                "DiffStyle set", f"{r['model']} ({_millions(r['parameters'])}), {r['resolution']} px, "
                f"{r['styles']} × {r['contents']} pairs, {r['ddim_steps']} DDIM steps, batch {r['batch_size']}",
                f"{r['images_per_s']:.2f} images/s ({r['generation_images_per_s']:.2f} generating); "
                f"{r['seconds_per_generation_step']:.3f} s per generation step",
                _seconds(r["seconds"]), mem(r), "max allocated" if r["memory_kind"].startswith("cuda") else "peak RSS"])
        elif part == "sde":
            lines.append([
                "score-SDE training step", f"{r['model']} ({_millions(r['parameters'])}), {r['resolution']} px, "
                f"batch {r['batch_size']}, Adam + clip + EMA",
                f"{r['steps_per_s']:.2f} steps/s ({r['images_per_s']:.0f} images/s)",
                f"{r['seconds_per_step']:.3f} s/step", mem(r),
                "max allocated" if r["memory_kind"].startswith("cuda") else "peak RSS"])
        elif part == "pixel":
            extra = f"; {r['memory_ratio_to_exact']:.2f}× exact's memory" if "memory_ratio_to_exact" in r else ""
            lines.append([
                f"pixel metrics, {r['mode']}", f"PixelMetrics, {r['images']} maps of {r['height']}², "
                f"{r['per_update']} per update" + (f", K = {r['num_thresholds']:,}" if r["num_thresholds"] else ""),
                f"states {size(r['state_bytes'])}{extra}; |exact − binned| ≤ {r['max_abs_diff_exact_binned']:.1e}",
                _seconds(r["seconds"]), mem(r, "peak_above_resident_bytes"), "host RSS above resident"])
        elif part == "concept":
            ratio = f" ({r['speed_ratio']:.2f}× fp32)" if r.get("speed_ratio") is not None else ""
            p = r["parameters"]
            scale = "" if r["scale"] == 1 else f" widths × {r['scale']:g}"
            lines.append([
                f"ADP concept step, `{r['config']}`",
                f"SD 2.1{scale} (UNet {_millions(p['unet'])}), {r['resolution']} px, batch {r['batch_size']}"
                + (", CLIP term" if r["clip_term"] else ""),
                f"{r['steps_per_s']:.2f} steps/s{ratio}", f"{r['seconds_per_step']:.3f} s/step", mem(r),
                "max allocated" if r["memory_kind"].startswith("cuda") else "peak RSS"])
    return table(["what", "setting", "figure", "time", "peak memory", "memory measured as"], lines)


def note(rows: list[dict]) -> str:
    summary = rows[-1]
    plumbing = ("**Plumbing, not results:** toy sizes (`--tiny`) on "
                if summary["plumbing"] else "Random weights at the papers' sizes on ")
    cuda = f", CUDA {summary['cuda']}, cuDNN {summary['cudnn']}" if summary["device"] == "cuda" else ""
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in summary["part_seconds"].items())
    return (f"{plumbing}{summary['device_name']}, torch {summary['torch']}{cuda}; TF32 matmul "
            f"{'on' if summary['tf32_matmul'] else 'off'}, cuDNN TF32 {'on' if summary['tf32_cudnn'] else 'off'}; "
            f"whole run {summary['wall_s']:.0f} s ({seconds}). Pixel metrics run on the host's CPU "
            "(PixelMetrics moves the maps there).")


if __name__ == "__main__":
    main()
