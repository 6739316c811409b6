"""AnomalyDiffusion on real textures: localizers trained on AnomalyDiffusion's pairs, on DRAEM's Perlin pairs and on
the real first third of each defect type (the oracle), scored on the other two thirds. Feeds the block
``anomalydiffusion_textures`` of docs/results/anomalydiffusion.md.

    python benchmarks/anomalydiffusion_textures.py --work /tmp/adtex \\
        --results benchmarks/results/anomalydiffusion_textures.jsonl --categories brick     # one category, ~20 min
    python benchmarks/anomalydiffusion_textures.py --results ... --categories --doc anomalydiffusion.md  # the table
    python benchmarks/anomalydiffusion_textures.py --tiny --work /tmp/t --results /tmp/r.jsonl   # smoke test

The task is ``datamodule=textures`` (:mod:`anomgen.data.textures`: scikit-image's real brick, grass and gravel
photographs; normal training crops from the top half, test crops from the bottom half; three painted defect types,
18 of each, of which the first third by file name, 6, train the generator and the oracle and 12 are tested), read at
``--image-size`` px. Per category (each phase's wall and CPU seconds are in the row):

1. **Base model** (the offline stand-in for the LDM txt2img-f8, which cannot be downloaded here): the project's tiny
   LDM stack (``tiny_text_to_image(kind="ldm")``: UNet2DConditionModel, AutoencoderKL, a random frozen LDM-BERT)
   at ``--image-size`` with a VAE of latent factor 2, trained here from scratch: the VAE (MSE + a small KL term) and
   then the UNet (ε-prediction, SD's DDPM schedule) on the category's **normal training crops** (with their eight
   flips / quarter turns) captioned with textual inversion's small templates and the category's name, and on
   **generic binary shapes** (ellipses, polygons, thick curves: :func:`generic_shapes`, no defect painter) captioned
   with the word "mask", 10 % of captions empty. The shapes stand in for what a web-scale model knows about masks:
   the mask model learns its per-type tokens inside this model, as the paper's does inside the LDM. Saved as a
   diffusers folder and loaded by ``pretrained.anomaly_text_to_image.source``, as a real model is.
2. **AnomalyDiffusion**: ``python train.py experiment=anomalydiffusion_mvtec datamodule=textures ...`` with every
   stage (the anomaly embedding and the mask model on the first third, ``--pairs`` pairs per type, the localizer on
   half normals / half pairs, picked on held-out normals + held-out generated pairs, evaluate).
3. **Perlin**: ``experiment=localizer_mvtec`` (DRAEM's Perlin pairs from the normal crops), the same localizer
   budget, ``datamodule.anomaly_train_fraction=1/3`` so that its test split is the same.
4. **Oracle**: the same with ``localizer.pairs=anomaly_train``: the 18 real training anomalies (6 per type) with
   their true masks (a seeded part held out for checkpoint selection).

The row: each localizer's pixel AUROC / AUPRO / AP and image AUROC on the test split (the good test crops and the
other two thirds of the anomalies), kNN on raw pixels as a reference, the sizes of each test split (checked equal),
the settings, and the seconds per phase. ``--doc PAGE`` rewrites the page's block from every row of ``--results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline_runs import append_rows, read_rows, run_pipeline  # noqa: E402

NAME = "anomalydiffusion_textures"
LOCALIZERS = ("anomalydiffusion", "perlin", "oracle")
METRICS = ("pixel_AUROC", "pixel_AUPRO", "pixel_AP", "image_AUROC")


# -- generic shapes: the base model's notion of "mask" --------------------------------------------------------------


def generic_shapes(n: int, size: int, seed: int) -> torch.Tensor:
    """``n`` binary shapes (n × size × size in {0, 1}): a rotated ellipse, a random polygon or a thick sine-wobbled
    curve, in turn, at random places and sizes. Made here, with none of the texture task's defect painter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    out = np.zeros((n, size, size), dtype=np.float32)
    for i in range(n):
        kind = i % 3
        cy, cx = rng.uniform(0.25, 0.75, size=2) * size
        if kind == 0:  # ellipse
            a, b = rng.uniform(0.05, 0.25, size=2) * size
            th = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
            v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
            shape = (u / a) ** 2 + (v / b) ** 2 <= 1.0
        elif kind == 1:  # star-shaped polygon: radius per angle, linearly interpolated between random vertices
            k = int(rng.integers(3, 8))
            radii = rng.uniform(0.05, 0.22, size=k) * size
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=k))
            phi = np.mod(np.arctan2(yy - cy, xx - cx), 2 * np.pi)
            r = np.interp(phi, np.concatenate([angles, angles[:1] + 2 * np.pi]),
                          np.concatenate([radii, radii[:1]]), period=2 * np.pi)
            shape = np.hypot(yy - cy, xx - cx) <= r
        else:  # a thick curve: a sine-wobbled segment
            length = rng.uniform(0.3, 0.7) * size
            th = rng.uniform(0, np.pi)
            t = np.linspace(-0.5, 0.5, 200)
            wob = rng.uniform(0.0, 0.08) * size * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t + rng.uniform(0, 6))
            py = cy + t * length * np.sin(th) + wob * np.cos(th)
            px = cx + t * length * np.cos(th) - wob * np.sin(th)
            d = np.min(np.hypot(yy[..., None] - py, xx[..., None] - px), axis=-1)
            shape = d <= rng.uniform(0.01, 0.04) * size + 0.5
        if not shape.any():
            shape[int(cy), int(cx)] = True
        out[i] = shape
    return torch.from_numpy(out)


def dihedral(images: torch.Tensor) -> torch.Tensor:
    """The eight flips / quarter turns of each image (8n × C × H × W)."""
    turns = [torch.rot90(images, k, dims=(-2, -1)) for k in range(4)]
    return torch.cat(turns + [t.flip(-1) for t in turns])


# -- the base model -------------------------------------------------------------------------------------------------


def normal_crops(root: str, category: str, size: int) -> torch.Tensor:
    """The category's normal training crops at ``size`` px, as the datamodule reads them (N × 3 × size × size)."""
    from anomgen.data import MVTecLayout

    data = MVTecLayout(root, category, split="train", image_size=size)
    return torch.stack([data[i]["image"] for i in range(len(data))]).float()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime


def train_vae(stack, images: torch.Tensor, steps: int, batch: int, lr: float, seed: int, crop: int = 32) -> dict:
    """The stack's AutoencoderKL trained on random ``crop``-px crops of ``images`` ([0, 1]): MSE on [-1, 1] plus
    1e-6 × KL, Adam with cosine decay; then its
    scaling factor set to 1 / std of the latent means (as LDM's was). Returns the reconstruction PSNR."""
    from anomgen.pixels import to_diffusion_range

    vae = stack.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x_all = to_diffusion_range(images)
    crop = min(crop, x_all.shape[-1])
    for step in range(steps):
        x = x_all[torch.randint(len(x_all), (batch,), generator=gen)]
        y0, x0 = (int(v) for v in torch.randint(0, x_all.shape[-1] - crop + 1, (2,), generator=gen))
        x = x[..., y0:y0 + crop, x0:x0 + crop]  # fully convolutional (no attention): trained on crops
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        loss = torch.mean((vae.decode(z).sample - x) ** 2) + 1e-6 * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step + 1) / steps))
        if (step + 1) % 250 == 0:
            print(f"  vae step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(x_all[i:i + 64]).latent_dist.mean for i in range(0, len(x_all), 64)])
        recon = torch.cat([vae.decode(means[i:i + 64]).sample for i in range(0, len(means), 64)])
    mse = torch.mean((recon.clamp(-1, 1) - x_all) ** 2).item() / 4  # on [0, 1]
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return {"psnr": 10 * math.log10(1 / max(mse, 1e-12)), "scaling_factor": float(vae.config.scaling_factor)}


def train_unet(stack, images: torch.Tensor, captions: list[str], steps: int, batch: int, lr: float, seed: int,
               empty_share: float = 0.1) -> dict:
    """The stack's UNet trained on (image, caption) pairs (ε-prediction; latents encoded once, the VAE's mean;
    captions encoded once by the frozen text encoder; ``empty_share`` of the draws uncaptioned), AdamW with warm-up
    and cosine decay. Returns the last 100 steps' mean loss."""
    from anomgen.diffusion.text2image import diffusion_loss, encode_latents

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = torch.cat([encode_latents(stack, images[i:i + 64], sample=False)
                             for i in range(0, len(images), 64)])
        unique = sorted(set(captions) | {""})
        states = stack.encode_prompts(unique)
    index = {c: i for i, c in enumerate(unique)}
    caption_ids = torch.tensor([index[c] for c in captions])
    empty = index[""]
    unet = stack.unet
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    warmup = max(1, steps // 20)
    losses = []
    for step in range(steps):
        pick = torch.randint(len(latents), (batch,), generator=gen)
        ids = caption_ids[pick].clone()
        ids[torch.rand(batch, generator=gen) < empty_share] = empty
        loss = diffusion_loss(stack, latents[pick], states[ids], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) /
                                                                             max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        losses.append(loss.item())
        if (step + 1) % 250 == 0:
            print(f"  unet step {step + 1}/{steps}: loss {np.mean(losses[-250:]):.4f}", flush=True)
    unet.eval().requires_grad_(False)
    return {"final_loss": float(np.mean(losses[-100:]))}


def base_stack(args):
    """The stack to train: the project's tiny LDM (its random frozen LDM-BERT, tokenizer and DDPM schedule) with a
    UNet2DConditionModel and an AutoencoderKL sized for a CPU: latent factor 2, no attention in the VAE, the UNet's
    cross-attention at its middle level (16 × 16 for 64 px images) and none at full latent resolution."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from anomgen.diffusion.text2image import tiny_text_to_image

    stack = tiny_text_to_image(kind="ldm", resolution=args.image_size, seed=args.seed, text_width=64)
    width, latent = args.unet_width, args.image_size // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        unet = UNet2DConditionModel(
            sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(width, 2 * width, 2 * width),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=stack.text_width, attention_head_dim=4, norm_num_groups=8)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, sample_size=args.image_size, mid_block_add_attention=False,
            scaling_factor=1.0)
    return dataclasses.replace(stack, unet=unet, vae=vae, latent_factor=2).freeze()


def base_model(root: str, args, work: Path) -> tuple[Path, dict]:
    """The base model, trained on the normal training crops of every texture of the task (one model for the three
    categories, as one LDM serves every MVTec category) and the generic shapes; a diffusers folder under ``work``,
    reused when the settings match."""
    from anomgen.diffusion.text2image import save_text_to_image
    from anomgen.generators.anomalydiffusion import TEMPLATES_SMALL

    settings = {k: getattr(args, k) for k in ("image_size", "vae_steps", "unet_steps", "unet_width", "n_shapes",
                                              "seed")}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    folder = work / f"base-model-{key}"
    info_file = work / f"base-model-{key}.json"
    if info_file.is_file() and folder.is_dir():
        return folder, {**json.loads(info_file.read_text()), "reused": True}
    stack = base_stack(args)
    gen = np.random.default_rng(args.seed)

    def captions(word: str, n: int) -> list[str]:
        return [TEMPLATES_SMALL[i].format(word) for i in gen.integers(len(TEMPLATES_SMALL), size=n)]

    images, texts = [], []
    # the task's categories, as written (the defect painter's module is the task's ground truth: not imported here)
    textures = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    for category in textures:
        normals = dihedral(normal_crops(root, category, args.image_size))
        images.append(normals)
        texts += captions(category, len(normals))
    shapes = generic_shapes(args.n_shapes, args.image_size, args.seed)[:, None].expand(-1, 3, -1, -1)
    images.append(shapes)
    texts += captions("mask", len(shapes))
    images = torch.cat(images)
    info = {"categories": textures, "normal_images": len(images) - len(shapes), "shape_images": len(shapes),
            "unet_parameters": sum(p.numel() for p in stack.unet.parameters()),
            "vae_parameters": sum(p.numel() for p in stack.vae.parameters())}
    t0, c0 = time.time(), _cpu_seconds()
    info["vae"] = train_vae(stack, images, args.vae_steps, 16, 2e-3, args.seed)
    stack = dataclasses.replace(stack, scaling_factor=float(stack.vae.config.scaling_factor))
    info["unet"] = train_unet(stack, images, texts, args.unet_steps, 16, 1e-3, args.seed)
    info["seconds"], info["cpu_seconds"] = round(time.time() - t0, 1), round(_cpu_seconds() - c0, 1)
    save_text_to_image(stack, folder, overwrite=True)
    info_file.write_text(json.dumps(info, indent=1))
    return folder, {**info, "reused": False}


# -- the three localizers -------------------------------------------------------------------------------------------


def common_overrides(args, category: str) -> list[str]:
    return [f"paths.textures_dir={Path(args.work) / 'textures'}", "datamodule=textures",
            f"datamodule.dataset.category={category}", "datamodule.num_workers=0", "trainer.accelerator=cpu",
            f"seed={args.seed}", f"localizer.epochs={args.localizer_epochs}",
            f"localizer.samples_per_epoch={args.localizer_samples}", f"localizer.base_width={args.localizer_width}",
            "localizer.batch_size=8"]


def anomalydiffusion_overrides(args, stack_folder: Path) -> list[str]:
    return ["experiment=anomalydiffusion_mvtec", f"anomalydiffusion.image_size={args.image_size}",
            f"pretrained.anomaly_text_to_image.source={stack_folder}",
            f"pretrained.anomaly_text_to_image.resolution={args.image_size}",
            f"anomalydiffusion.embedding_steps={args.embedding_steps}",
            f"anomalydiffusion.mask_train_steps={args.mask_steps}", f"anomalydiffusion.num_per_type={args.pairs}",
            f"anomalydiffusion.steps={args.ddim_steps}", f"anomalydiffusion.mask_steps={args.ddim_steps}",
            f"anomalydiffusion.num_type_tokens={args.type_tokens}", "anomalydiffusion.batch_size=4",
            f"anomalydiffusion.aar={args.aar}", "generation_metrics=null",  # IS / IC-LPIPS need Inception / AlexNet
            f"anomalydiffusion.mask_tokens={args.mask_tokens}",
            f"anomalydiffusion.defect_types=[{','.join(args.generate_types)}]" if args.generate_types
            else "anomalydiffusion.defect_types=null",
            # the defect-type classifier needs pairs of every type the test holds
            *(["~pipeline.classifier"] if args.generate_types else [
                f"defect_classifier.epochs={args.classifier_epochs}", f"defect_classifier.image_size={args.image_size}",
                "pretrained.defect_classifier=null"]),  # ResNet-34 from random weights (no ImageNet weights here)
            "anomalydiffusion.encoder={channels: [16, 32, 64, 128], "
            "head_channels: 128}"]


def localizer_overrides(args, pairs: str) -> list[str]:
    out = ["experiment=localizer_mvtec", f"localizer.image_size={args.image_size}",
           "+datamodule.anomaly_train_fraction=0.3333333333333333"]
    return out + (["localizer.pairs=anomaly_train"] if pairs == "oracle" else [])


def run_category(stack_folder: Path, base_info: dict, category: str, args, work: Path) -> dict:
    row = {"name": NAME, "category": category, "tiny": args.tiny, "settings": settings_of(args), "seconds": {},
           "cpu_seconds": {}, "metrics": {}, "knn_pixels": {},
           "base_model": base_info}

    def timed(phase: str, fn):
        t0, c0 = time.time(), _cpu_seconds()
        out = fn()
        row["seconds"][phase] = round(time.time() - t0, 1)
        row["cpu_seconds"][phase] = round(_cpu_seconds() - c0, 1)
        print(f"{category} {phase}: {row['seconds'][phase]} s", flush=True)
        return out

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    common = common_overrides(args, category)
    runs = {"anomalydiffusion": anomalydiffusion_overrides(args, stack_folder),
            "perlin": localizer_overrides(args, "perlin"), "oracle": localizer_overrides(args, "oracle")}
    for name in LOCALIZERS:
        again = args.continue_run.get(name)
        if again:  # the stages that finished there are skipped (train.py's pipeline), the rest run
            runs[name] = [*runs[name], f"hydra.run.dir={again}"]
            row.setdefault("continued", {})[name] = again
        run_dir, metrics = timed(name, lambda: run_pipeline(work / "runs", *runs[name], *common, env=env))
        prefix = "evaluate/test/unet_localizer/"
        row["metrics"][name] = {m: metrics.get(prefix + m) for m in METRICS}
        row.setdefault("run_dirs", {})[name] = str(run_dir)
        if name == "anomalydiffusion":
            row["knn_pixels"] = {m: metrics.get(f"evaluate/test/knn_pixels/{m}") for m in METRICS}
            row["defect_type_accuracy"] = metrics.get("classifier/test/defect_type_accuracy")
            row["num_pairs"] = metrics.get("generate/predict/num_exported")
    return row


def settings_of(args) -> dict:
    keys = ("image_size", "vae_steps", "unet_steps", "unet_width", "n_shapes", "embedding_steps", "mask_steps",
            "pairs", "ddim_steps", "type_tokens", "mask_tokens", "generate_types", "aar", "classifier_epochs",
            "localizer_epochs", "localizer_samples", "localizer_width", "threads", "seed")
    return {k: getattr(args, k) for k in keys}


# -- the page -------------------------------------------------------------------------------------------------------


def doc_body(rows: list[dict]) -> str:
    from docpage import table

    if not rows:
        return "(no rows yet)"
    out = []
    if any(r.get("tiny") for r in rows):
        out.append("**Plumbing, not results:** rows from `--tiny` (toy budgets) show that every phase runs.\n")
    names = {"anomalydiffusion": "AnomalyDiffusion pairs", "perlin": "Perlin pairs (DRAEM)",
             "oracle": "real first third (oracle)", "knn": "kNN raw pixels (no training)"}
    body = []
    for r in rows:
        for name in (*LOCALIZERS, "knn"):
            values = r["knn_pixels"] if name == "knn" else r["metrics"][name]
            body.append([r["category"], names[name],
                         *("" if values.get(m) is None else f"{100 * values[m]:.1f}" for m in METRICS)])
    for name in (*LOCALIZERS, "knn"):
        cols = [[(r["knn_pixels"] if name == "knn" else r["metrics"][name]).get(m) for r in rows] for m in METRICS]
        body.append(["**mean**", names[name],
                     *("" if any(v is None for v in c) else f"{100 * float(np.mean(c)):.1f}" for c in cols)])
    out.append(table(["category", "localizer trained on", "pixel AUROC", "pixel AUPRO", "pixel AP", "image AUROC"],
                     body))
    s = rows[-1]["settings"]
    counts = {r["category"]: r["settings"]["pairs"] for r in rows}
    types = s.get("generate_types") or "every type"
    pairs = (str(s["pairs"]) if len(set(counts.values())) == 1
             else ", ".join(f"{c} {n}" for c, n in counts.items())) + f" ({', '.join(types)})"
    out.append(f"\nSettings: {s['image_size']} px; base model VAE {s['vae_steps']} + UNet {s['unet_steps']} steps; "
               f"embedding {s['embedding_steps']} steps, mask model {s['mask_steps']} steps, pairs per type "
               f"{pairs}, DDIM {s['ddim_steps']} steps, AAR {s['aar']}; localizer {s['localizer_epochs']} epochs × "
               f"{s['localizer_samples']} draws, base width {s['localizer_width']}; seed {s['seed']}.\n")
    time_rows = []
    for r in rows:
        base = r["base_model"].get("cpu_seconds", 0) / len(r["base_model"].get("categories", [1]))
        phases = [r["cpu_seconds"].get(p, 0) for p in LOCALIZERS]
        cont = r.get("continued") or {}
        time_rows.append([r["category"], f"{base / 60:.1f}",
                          *(f"{v / 60:.1f}" + (" (continued)" if name in cont else "") for name, v in zip(LOCALIZERS,
                                                                                                          phases)),
                          f"{(base + sum(phases)) / 60:.1f}"])
    out.append("CPU minutes per category (the base model's, trained once for the three textures, split in three):\n")
    out.append(table(["category", "base model (1/3)", "AnomalyDiffusion (all stages)", "Perlin", "oracle",
                      "total"], time_rows))
    if any(r.get("continued") for r in rows):
        out.append("\n(continued): an interrupted run continued in its folder (`--continue-run`); only the stages "
                   "that ran again are counted, the others' times are in that run's `train.log`.")
    b = rows[-1]["base_model"]
    if "vae" in b:
        out.append(f"\nBase model: VAE reconstruction PSNR {b['vae']['psnr']:.1f} dB on the training images; UNet "
                   f"final loss {b['unet']['final_loss']:.3f}; {b['unet_parameters'] / 1e6:.2f} M UNet parameters.")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/anomalydiffusion_textures"))
    p.add_argument("--results", type=Path, required=True)
    p.add_argument("--categories", nargs="*", default=["brick", "grass", "gravel"])
    p.add_argument("--doc", default=None, help="a page of docs/results/ whose block is rewritten from --results")
    p.add_argument("--tiny", action="store_true", help="toy budgets: plumbing rows, not results")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--unet-steps", type=int, default=2000)
    p.add_argument("--unet-width", type=int, default=32)
    p.add_argument("--n-shapes", type=int, default=512)
    p.add_argument("--embedding-steps", type=int, default=1000)
    p.add_argument("--mask-steps", type=int, default=1500)
    p.add_argument("--mask-tokens", type=int, default=16, help="the mask model's vectors per type (code: 16)")
    p.add_argument("--generate-types", nargs="*", default=["patch", "stain"],
                   help="the defect types to generate pairs of (none given: every type)")
    p.add_argument("--pairs", type=int, default=60, help="pairs per defect type")
    p.add_argument("--ddim-steps", type=int, default=25)
    p.add_argument("--type-tokens", type=int, default=4)
    p.add_argument("--aar", default="off")
    p.add_argument("--classifier-epochs", type=int, default=10)
    p.add_argument("--localizer-epochs", type=int, default=15)
    p.add_argument("--localizer-samples", type=int, default=320)
    p.add_argument("--localizer-width", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--continue-run", nargs="*", default=[], metavar="NAME=DIR",
                   help="continue an interrupted pipeline run of one category (anomalydiffusion, perlin or oracle) in "
                        "its folder DIR: its finished stages are skipped; the row then says so and its CPU times "
                        "count only what ran")
    args = p.parse_args(argv)
    pairs = [item.split("=", 1) for item in args.continue_run]
    if any(len(item) != 2 or item[0] not in LOCALIZERS for item in pairs):
        p.error(f"--continue-run takes NAME=DIR with NAME one of {LOCALIZERS}, got {args.continue_run}")
    args.continue_run = dict(pairs)
    if args.tiny:
        for key, value in (("vae_steps", 3), ("unet_steps", 3), ("unet_width", 16),
                           ("n_shapes", 6), ("embedding_steps", 2), ("mask_steps", 2), ("pairs", 2),
                           ("ddim_steps", 2), ("type_tokens", 2), ("localizer_epochs", 1), ("localizer_samples", 8),
                           ("classifier_epochs", 1), ("localizer_width", 8)):
            setattr(args, key, value)
    return args


def main(argv=None) -> list[dict]:
    from anomgen.data import write_texture_task

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    root = write_texture_task(args.work / "textures")
    rows = read_rows(args.results)
    done = {(r["category"], r.get("tiny", False)) for r in rows}
    todo = [c for c in args.categories if (c, args.tiny) not in done]
    if todo:
        stack_folder, base_info = base_model(root, args, args.work)
        print(f"base model: {stack_folder} ({base_info})", flush=True)
    for category in todo:
        row = run_category(stack_folder, base_info, category, args, args.work)
        append_rows(args.results, [row])
        rows.append(row)
    rows = [r for r in rows if r.get("name") == NAME and r.get("tiny", False) == args.tiny]
    text = doc_body(rows)
    print(text)
    if args.doc:
        from docpage import write_doc

        write_doc(args.doc, NAME, "anomalydiffusion_textures.py", argv if argv is not None else sys.argv[1:], text)
    return rows


if __name__ == "__main__":
    main()
