"""ADP concept-learning steps at Stable Diffusion 2.1 size with random weights: steps/s and peak memory of the
memory settings, each as a ratio to the float32 baseline of the same run. Feeds "ADP concept learning at SD 2.1
size" of docs/results/performance.md.

The stack is :func:`anomgen.diffusion.text2image.random_sd21_stack`: SD 2.1's UNet (865.9 M parameters) and VAE
(83.7 M), and its text encoder (340 M) converted from a random open_clip ViT-H-14, which stays on the device as ADP's
classifier g. ``--scale`` shrinks every channel width (a multiple of 1/16), ``--resolution`` the images (768 px:
96 × 96 latents), for smoke runs on a CPU.

One step is what ``models/adp.py``'s ``ADPConcept.training_step`` does, with Lightning's optimizer loop around it:

1. the latents of the batch's images: the VAE encodes them (a posterior draw) at every step, or they are drawn from
   a :class:`~anomgen.diffusion.text2image.LatentCache` (the stage's way: the K shots are encoded once);
2. the SD text encoder on the prompts (a random template around the placeholder per image), gradients to its token
   table;
3. :func:`~anomgen.diffusion.text2image.diffusion_loss` (v-prediction: SD 2.1's target);
4. with ``--clip-term`` (default): ADP's CLIP term of Eq. 3: the 7 templates × 2 states through the classifier's
   24-layer text tower, fed from the trained table, against the shots' image features (computed once, as the stage
   does at set-up): −α · mean P_CLIP(S_n(c) | x);
5. backward (through a ``GradScaler`` with fp16, as Lightning's ``16-mixed``), AdamW on the token table,
   ``zero_grad``, :meth:`~anomgen.diffusion.textual_inversion.TextualInversion.restore_frozen_rows`.

The text encoder is in train mode, as it is under Lightning (it is a submodule of the stage); the UNet, VAE and
classifier are in eval mode. Configurations, run in this order (each switch is made once: the fp16 cast and
checkpointing stay on for the configurations after them):

- ``fp32``: everything float32, VAE encode per step: the baseline of the ratios;
- ``fp32_cached``: float32, latents from the cache;
- ``fp16``: UNet and VAE cast to fp16 (``configure_memory(frozen_dtype=...)``) + autocast, VAE per step;
- ``fp16_cached``: the same, latents from the cache;
- ``fp16_ckpt``: + gradient checkpointing (UNet and text encoder), VAE per step;
- ``fp16_ckpt_cached``: ADP's memory-saving setting (``model.frozen_dtype=fp16 model.gradient_checkpointing=true
  trainer.precision=16-mixed``).

Each (configuration, batch size) runs ``--warmup`` untimed steps and ``--steps`` timed ones with a new AdamW.
Memory: on CUDA ``torch.cuda.max_memory_allocated`` over those steps (weights included; ``resident_bytes`` is what
was allocated before them); on a CPU the process's peak RSS over them (``/proc/self/clear_refs`` resets it), which
counts memory the allocator kept after earlier configurations: a rough figure. A configuration that runs out of
memory is reported as such and the run goes on.

Output: one JSON object per (configuration, batch size) on stdout, then a summary; ``--results FILE`` appends them
(``benchmarks/results/*.jsonl``). The plan, a time estimate (after each measurement, from the step times so far) and
progress go to stderr. ``--budget-minutes`` (default 5) lowers ``--steps`` (to no fewer than 3) when the estimate is
longer, so the default GPU run (6 configurations × batch sizes 1 and 4 × 13 steps at 768 px) stays within minutes.

    python benchmarks/concept_speed.py --device cuda --results benchmarks/results/concept_speed.jsonl \\
        --doc docs/results/performance.md                     # SD 2.1 at 768 px, batch 1 and 4
    python benchmarks/concept_speed.py --device cpu --scale 0.0625 --resolution 64 --batch-sizes 1 \\
        --steps 2 --warmup 1 --threads 1                       # CPU smoke run: about a minute on 2 busy cores

``--doc PAGE`` rewrites the page's block ``<!-- begin: concept_speed -->`` ... ``<!-- end: ... -->`` with the
command and the table of this run; the rest of the page is left as it is.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

#: the configurations in the order they run: (name, half precision, gradient checkpointing, latents cached)
CONFIGS = {
    "fp32": (False, False, False),
    "fp32_cached": (False, False, True),
    "fp16": (True, False, False),
    "fp16_cached": (True, False, True),
    "fp16_ckpt": (True, True, False),
    "fp16_ckpt_cached": (True, True, True),
}
BASELINE = "fp32"
#: what the time estimate assumes against the fp32 step: half precision, checkpointing (deliberately pessimistic)
_HALF_FACTOR, _CKPT_FACTOR = 0.6, 1.35
PLACEHOLDER = "<adp-n>"


def log(message: str) -> None:
    print(f"[concept_speed] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ memory


class Memory:
    """Peak memory of a measurement: CUDA's allocator statistics, or the process's peak RSS on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss"
        self.available = device.type == "cuda" or self._reset_rss()

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    @staticmethod
    def _reset_rss() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            return True
        except OSError:
            return False

    def reset(self) -> int | None:
        """Free what can be freed, start a new peak; returns the memory in use now."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return int(torch.cuda.memory_allocated(self.device))
        if not self.available or not self._reset_rss():
            return None
        return self._status("VmRSS")

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return self._status("VmHWM") if self.available else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------------ the step


@dataclass
class Setup:
    stack: object
    concept: object
    images: torch.Tensor  # N × 3 × R × R in [0, 1], on the device
    support_features: torch.Tensor  # N × D, the classifier's image features of the images
    generator: torch.Generator
    clip_term: bool
    alpha: float = 1.0


def build(args: argparse.Namespace, device: torch.device) -> Setup:
    from anomgen.diffusion.text2image import random_sd21_stack
    from anomgen.diffusion.textual_inversion import TextualInversion
    from anomgen.encoders.clip import embed_images

    stack = random_sd21_stack(scale=args.scale, resolution=args.resolution, device=device, seed=args.seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed)
        concept = TextualInversion(stack.tokenizer, stack.text_encoder, PLACEHOLDER, 1, "object")
    concept.freeze_text_encoder()
    stack.text_encoder.train()  # as under Lightning: the stage's submodule (transformers checkpoints in train only)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    n = max(args.batch_sizes)
    images = torch.rand(n, 3, args.resolution, args.resolution, generator=generator, device=device)
    with torch.no_grad():
        support_features = embed_images(stack.open_clip_model, images) if args.clip_term else None
    if not args.clip_term:
        stack.open_clip_model = None  # the classifier is not needed on the device
        gc.collect()
    return Setup(stack, concept, images, support_features, generator, args.clip_term)


def clip_term(setup: Setup, index: torch.Tensor) -> torch.Tensor:
    """ADP's CLIP term of Eq. 3 (``ADPConcept.concept_terms`` for phase normal)."""
    from anomgen.detectors import adp
    from anomgen.encoders.clip_text import encode_text_open_clip

    concept, classifier = setup.concept, setup.stack.open_clip_model

    def encode(prompts: list[str]) -> torch.Tensor:
        ids = concept.input_ids(prompts)
        return encode_text_open_clip(classifier, ids, concept.token_embeddings(ids))

    states = adp.averaged_state_embeddings(encode, PLACEHOLDER, adp.TEMPLATES)
    return adp.normal_concept_loss(adp.state_probabilities(setup.support_features[index], states, adp.DEFAULT_TAU),
                                   setup.alpha)


def concept_step(setup: Setup, batch: int, cache, optimizer, scaler, autocast) -> tuple[float, bool]:
    """One concept-learning step; returns the loss and whether the ``GradScaler`` skipped the optimizer step (an
    overflow in the fp16 gradients: the scale is halved, as under Lightning's ``16-mixed``)."""
    from anomgen.detectors import adp
    from anomgen.diffusion.text2image import diffusion_loss, encode_latents

    stack, gen = setup.stack, setup.generator
    device = gen.device
    index = torch.arange(batch, device=device) % len(setup.images)
    picks = torch.randint(len(adp.TEMPLATES), (batch,), generator=gen, device=device).tolist()
    prompts = [adp.TEMPLATES[j].format(PLACEHOLDER) for j in picks]
    with autocast():
        if cache is not None:
            latents = cache.sample(index, generator=gen)
        else:
            with torch.no_grad():
                latents = encode_latents(stack, setup.images[index], generator=gen)
        loss = diffusion_loss(stack, latents, setup.concept.encode(prompts), generator=gen)
        if setup.clip_term:
            loss = loss + clip_term(setup, index)
    skipped = False
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale
    else:
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    setup.concept.restore_frozen_rows()
    return float(loss.detach()), skipped


# ------------------------------------------------------------------------------------------------------ a run


def apply_config(setup: Setup, name: str, args: argparse.Namespace, state: dict) -> None:
    """Bring the stack to configuration ``name``: the fp16 cast and checkpointing are switched on once, never off."""
    from anomgen.diffusion.text2image import configure_memory

    half, ckpt, _ = CONFIGS[name]
    if half and not state["half"]:
        configure_memory(setup.stack, frozen_dtype=args.half)
        state["half"] = True
    if ckpt and not state["ckpt"]:
        configure_memory(setup.stack, gradient_checkpointing=True)
        state["ckpt"] = True


def measure(setup: Setup, name: str, batch: int, args: argparse.Namespace, device: torch.device, memory: Memory,
            steps: int) -> dict:
    from anomgen.diffusion.text2image import LatentCache, autocast_context

    half, ckpt, cached = CONFIGS[name]
    precision = args.half if half else None
    row = {"name": "concept_step", "config": name, "batch_size": batch, "half": args.half if half else None,
           "gradient_checkpointing": ckpt, "latents": "cached" if cached else "vae_per_step"}
    cache = None
    if cached:  # the stage encodes its shots on first use; measured on its own
        before = memory.reset()
        synchronize(device)
        t0 = time.perf_counter()
        cache = LatentCache(setup.stack, setup.images)  # the K shots
        cache.mean()
        synchronize(device)
        row["cache_encode_s"] = round(time.perf_counter() - t0, 4)
        peak = memory.peak()
        row["cache_encode_peak_bytes"] = peak
        row["cache_encode_above_resident_bytes"] = None if peak is None or before is None else peak - before
    optimizer = torch.optim.AdamW(setup.concept.trainable_parameters(), lr=5e-4, betas=(0.9, 0.999),
                                  weight_decay=1e-2)
    scaler = torch.amp.GradScaler(device.type) if precision in ("fp16", "float16") else None
    resident = memory.reset()
    times, losses, skipped = [], [], []
    for i in range(args.warmup + steps):
        synchronize(device)
        t0 = time.perf_counter()
        loss, skip = concept_step(setup, batch, cache, optimizer, scaler, lambda: autocast_context(device, precision))
        synchronize(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        skipped.append(skip)
    timed = times[args.warmup:]
    peak = memory.peak()
    row.update({
        "warmup": args.warmup, "steps": steps, "seconds_per_step": round(sum(timed) / len(timed), 5),
        "median_seconds_per_step": round(statistics.median(timed), 5),
        "steps_per_s": round(len(timed) / sum(timed), 4), "images_per_s": round(batch * len(timed) / sum(timed), 4),
        "first_step_s": round(times[0], 4), "memory_kind": memory.kind, "peak_bytes": peak,
        "resident_bytes": resident, "peak_above_resident_bytes": None if peak is None or resident is None
        else peak - resident, "finite_loss": all(map(math.isfinite, losses)),
    })
    if scaler is not None:
        row["grad_scale"] = float(scaler.get_scale())
        row["skipped_optimizer_steps_timed"] = sum(skipped[args.warmup:])
    del optimizer, cache
    return row


def _factor(name: str) -> float:
    half, ckpt, _ = CONFIGS[name]
    return (_HALF_FACTOR if half else 1.0) * (_CKPT_FACTOR if ckpt else 1.0)


def estimate_seconds(done: list[dict], todo: list[tuple[str, int]], warmup: int, steps: int) -> float:
    """Seconds the measurements ``todo`` will take: each step from the measured step of the same configuration
    family at that batch size (or the nearest measured batch size, scaled linearly), times the assumed factors."""
    measured = {}  # batch -> fp32-equivalent seconds per step
    for r in done:
        if "error" not in r:
            measured.setdefault(r["batch_size"], r["seconds_per_step"] / _factor(r["config"]))
    if not measured:
        return float("nan")
    total = 0.0
    for name, batch in todo:
        near = min(measured, key=lambda b: abs(b - batch))
        per_step = measured[near] * (batch / near if batch > near else 1.0)
        total += (warmup + steps) * per_step * _factor(name)
    return total


def fit_steps(done: list[dict], todo: list[tuple[str, int]], warmup: int, steps: int, elapsed: float,
              budget_s: float, least: int = 3) -> int:
    """The timed steps per measurement that keep the run within ``budget_s`` (0: no budget) by the estimate, never
    more than ``steps`` nor fewer than ``least`` (or ``steps`` if that is fewer)."""
    if not todo or not budget_s or elapsed + estimate_seconds(done, todo, warmup, steps) <= budget_s:
        return steps
    per_timed = estimate_seconds(done, todo, 0, 1)
    fit = int((budget_s - elapsed - estimate_seconds(done, todo, warmup, 0)) / per_timed)
    return max(min(least, steps), min(steps, fit))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    parser.add_argument("--scale", type=float, default=1.0, help="channel-width factor, a multiple of 1/16 (1: SD 2.1)")
    parser.add_argument("--resolution", type=int, default=768, help="image size in pixels, a multiple of 64")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--half", default="fp16", choices=["fp16", "bf16"], help="the half precision of fp16_*")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration and batch size")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--clip-term", action=argparse.BooleanOptionalAction, default=True,
                        help="ADP's CLIP term through the ViT-H-14 text tower (default: on)")
    parser.add_argument("--budget-minutes", type=float, default=5.0,
                        help="lower --steps (to no fewer than 3) when the estimated run is longer; 0: no limit")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=None, help="a .jsonl file the rows are appended to")
    parser.add_argument("--doc", default=None, help="a page of docs/results/ whose block this run's table rewrites")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or min(args.batch_sizes) < 1:
        parser.error("--warmup, --steps and the batch sizes must be at least 1")
    args.batch_sizes = sorted(set(args.batch_sizes))
    args.configs = [c for c in CONFIGS if c in args.configs]
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu with a small --scale/--resolution)")
    if device.type == "cuda":
        if device.index is None:  # torch.cuda.set_device and the memory statistics want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    threads = torch.get_num_threads()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({threads} torch thread{'s' if threads > 1 else ''})"
    plan = [(c, b) for c in args.configs for b in args.batch_sizes]
    latent = args.resolution // 8
    log(f"plan: SD 2.1 architecture at scale {args.scale:g}, {args.resolution} px ({latent}×{latent} latents), "
        f"random weights, on {device_name}; CLIP term {'on' if args.clip_term else 'off'}")
    log(f"      {len(args.configs)} configurations ({', '.join(args.configs)}) × batch sizes {args.batch_sizes} = "
        f"{len(plan)} measurements of {args.warmup} warm-up + {args.steps} timed steps "
        f"({len(plan) * (args.warmup + args.steps)} steps)")
    log("      time estimate: after each measurement, from the step times so far (a configuration not yet run: "
        f"fp16 assumed {1 / _HALF_FACTOR:.1f}× faster, checkpointing {_CKPT_FACTOR:.2f}× slower, batch sizes "
        "linear)" + (f"; budget {args.budget_minutes:g} min" if args.budget_minutes else ""))

    t_start = time.perf_counter()
    setup = build(args, device)
    build_s = time.perf_counter() - t_start
    params = {name: sum(p.numel() for p in module.parameters()) for name, module in setup.stack.modules().items()}
    log(f"built in {build_s:.1f} s: " + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in params.items()))
    memory = Memory(device)
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S")
    common = {"run": run_id, "device": device.type, "device_name": device_name, "scale": args.scale,
              "resolution": args.resolution, "latent_size": latent, "clip_term": args.clip_term,
              "torch": torch.__version__, "parameters": params,
              "tf32_matmul": torch.backends.cuda.matmul.allow_tf32, "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    rows, state, steps = [], {"half": False, "ckpt": False}, args.steps
    baselines: dict[int, dict] = {}
    for i, (name, batch) in enumerate(plan):
        apply_config(setup, name, args, state)
        try:
            row = measure(setup, name, batch, args, device, memory, steps)
        except torch.OutOfMemoryError as err:
            row = {"name": "concept_step", "config": name, "batch_size": batch, "error": "out of memory",
                   "detail": str(err).splitlines()[0][:300]}
            setup.concept.text_encoder.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row = {**row, **common}
        if name == BASELINE and "error" not in row:
            baselines[batch] = row
        base = baselines.get(batch)
        if base is not None and "error" not in row:
            row["speed_ratio"] = round(row["steps_per_s"] / base["steps_per_s"], 4)
            if row.get("peak_bytes") and base.get("peak_bytes"):
                row["memory_ratio"] = round(row["peak_bytes"] / base["peak_bytes"], 4)
        print(json.dumps(row), flush=True)
        rows.append(row)
        elapsed = time.perf_counter() - t_start
        todo = plan[i + 1:]
        rest = estimate_seconds(rows, todo, args.warmup, steps)
        log(f"{i + 1}/{len(plan)} done ({name}, batch {batch}: "
            + (row["error"] if "error" in row else f"{row['seconds_per_step']:.3f} s/step") + f") at {elapsed:.0f} s; "
            f"estimate {elapsed + rest:.0f} s in all")
        new = fit_steps(rows, todo, args.warmup, steps, elapsed, 60 * args.budget_minutes)
        if new < steps:
            log(f"over the {args.budget_minutes:g}-minute budget: {new} timed steps instead of {steps} from here on "
                "(each row says how many)")
            steps = new
    summary = {"name": "concept_speed_summary", **common, "build_s": round(build_s, 2),
               "wall_s": round(time.perf_counter() - t_start, 2), "baseline": BASELINE,
               "speed_ratio": {f"{r['config']}@{r['batch_size']}": r.get("speed_ratio") for r in rows},
               "memory_ratio": {f"{r['config']}@{r['batch_size']}": r.get("memory_ratio") for r in rows}}
    print(json.dumps(summary), flush=True)
    rows.append(summary)
    if args.results:
        from pipeline_runs import append_rows

        append_rows(Path(args.results), rows)
    if args.doc:
        write_table(args, rows, argv)
    return rows


def write_table(args: argparse.Namespace, rows: list[dict], argv: list[str] | None) -> None:
    from docpage import size, table, write_doc

    summary = rows[-1]
    cuda = summary["device"] == "cuda"
    def mem(row: dict, key: str) -> str | None:
        return None if row.get(key) is None else size(row[key])

    def ratio(row: dict, key: str) -> str | None:
        return None if row.get(key) is None else f"{row[key]:.2f}×"

    lines = []
    for r in rows[:-1]:
        if "error" in r:
            lines.append([f"`{r['config']}`", r["batch_size"], r["error"], None, None, None, None])
            continue
        lines.append([f"`{r['config']}`", r["batch_size"], f"{r['steps_per_s']:.2f}", ratio(r, "speed_ratio"),
                      mem(r, "peak_bytes"), ratio(r, "memory_ratio"), mem(r, "peak_above_resident_bytes")])
    memory = "peak memory (max allocated)" if cuda else "peak RSS"
    body = table(["configuration", "batch", "steps/s", "speed × fp32", memory, "memory × fp32",
                  "peak − resident"], lines)
    p = summary["parameters"]
    steps = sorted({r["steps"] for r in rows[:-1] if "steps" in r})
    size_note = ("SD 2.1 size" if summary["scale"] == 1 else f"SD 2.1 widths × {summary['scale']:g}")

    def millions(n: int) -> str:
        return f"{n / 1e6:.0f} M" if n >= 1e7 else f"{n / 1e6:.1f} M"

    note = (f"{summary['device_name']}, torch {summary['torch']}; {size_note} (UNet {millions(p['unet'])}, VAE "
            f"{millions(p['vae'])}, text encoder {millions(p['text_encoder'])}"
            + (f", classifier {millions(p['open_clip_model'])}" if "open_clip_model" in p else "")
            + f" parameters), random weights, {summary['resolution']} px ({summary['latent_size']}² latents); "
            f"CLIP term {'on' if summary['clip_term'] else 'off'}; {args.warmup} warm-up + "
            f"{'/'.join(map(str, steps))} timed steps each; half precision {args.half}; "
            f"TF32 matmul {'on' if summary['tf32_matmul'] else 'off'}, cuDNN {'on' if summary['tf32_cudnn'] else 'off'}"
            f"; ratios against `fp32` at the same batch size in this run; whole run {summary['wall_s']:.0f} s.")
    if not cuda:
        note += " CPU: not the GPU's ratios; peak RSS counts memory the allocator kept from earlier configurations."
    write_doc(args.doc, "concept_speed", "concept_speed.py", sys.argv[1:] if argv is None else argv, body, note)


if __name__ == "__main__":
    main()
