"""Does textual inversion learn? A text-to-image model trained from scratch on Animal-MNIST without one class, a
token learned for that class from K = 8 of its images, and a classifier that says what the generations show. Feeds
the section "Does textual inversion learn? (Animal-MNIST)" of docs/results/adp.md.

    python benchmarks/adp_ti_animals.py --doc docs/results/adp.md    # the real run: 20-25 min on one CPU thread
    python benchmarks/adp_ti_animals.py --tiny --results /tmp/r.jsonl --grid /tmp/g.png   # smoke test, seconds

Phases (each timed; seeded by ``--seed``):

1. **Data.** Animal-MNIST (the package's 10,000 silhouettes), the project's stratified split (70 % train / 30 %
   test, split seed 0), 28×28 padded to 32×32 with background; grey, repeated to 3 channels for the stack.
2. **Classifier.** A small CNN on all ten classes' training images (flips, ±2 px shifts, and grain: Gaussian noise
   and salt on half the images, ``--classifier-noise``, so that it calls a grainy generated horse a horse and not a
   Zebra, the one class with texture); its test accuracy on the real test images.
3. **Text-to-image model.** ``tiny_text_to_image`` (UNet2DConditionModel, a ``CLIPTextModel`` converted from a
   random open_clip text tower, CLIP's tokenizer, SD's DDPM schedule, ε-prediction) with the UNet trained on the
   nine other classes (``--held-out``, Zebra by default) with captions ``"a photo of a {animal}"`` (lower-case
   class names), 10 % of them empty (classifier-free guidance). The text encoder stays **frozen and random**: the
   class words are fixed random rows of the token table, and the UNet learns to read them; the learned token then
   lives in the same table, read by the same frozen encoder, as in diffusers' textual inversion (where CLIP is
   frozen too). The latent is a fixed **space-to-depth** codec (2×2 pixel unshuffle: 32×32 grey ↔ 16×16×4 exactly,
   scaling factor 1) in place of the AutoencoderKL: lossless, free, and it learns nothing from any class, where a
   random frozen VAE does not reconstruct, and a VAE trained first costs minutes and either sees the held-out
   class or may not reconstruct its stripes. Training goes through the layer: ``LatentCache`` (the images encoded
   once), ``diffusion_loss``; AdamW, warm-up and cosine decay, an EMA of the weights (used from then on).
4. **Textual inversion.** ``TextualInversion`` adds ``<zebra-ti>`` (one vector) initialised from ``--init-word``
   (``horse``: the nearest trained class in shape, so the starting point already draws a horse-like animal and any
   move towards Zebra is the token's) and learns it from K shots of the held-out class (its first K training
   images in a seeded order, and their mirror images) with ``"a photo of a <zebra-ti>"``: only its row trains
   (``restore_frozen_rows`` after each step), AdamW (0.9, 0.999, wd 1e-2) as diffusers' script.
   The control ``<random-ti>``: the initial word's row moved as far as the token moved, in a random direction (does
   any move away from the word give "Zebra"?).
5. **Held-out denoising loss.** The ε-loss of the shots, of test images of the held-out class (not the shots) and of
   the initial word's class, under the empty prompt, the initial word, the learned token and the control, with the
   same noise and timesteps for every prompt: a likelihood-like measure of what the token learned.
6. **Generation.** DDIM (``stack.sampling_scheduler``, η = 0, ``--ddim-steps``) with classifier-free guidance
   (``--guidance``), written out: ``--n`` images each from the learned token's, the initial word's and the
   control's prompt, and ``--n-per-class`` from each trained class's prompt. The classifier's calls: the held-out
   class's share for token vs word vs control (the claim), per-class accuracy on the trained classes (does the
   model draw its classes at all) and how often they are called the held-out class (the classifier's false
   positives on generations). A grid of shots and generations is saved (``--grid``).

One JSON row (figures, settings, seconds per phase, the load average as a sign of CPU contention) is printed and
appended to ``--results``. ``--doc PAGE`` rewrites the page's block ``<!-- begin: adp_ti_animals -->`` ...
``<!-- end: adp_ti_animals -->`` with the command and the tables of this run. ``--checkpoint-dir DIR`` (a
development aid) keeps the classifier and the trained UNet there and reuses them when the settings that made them
match, so that the textual-inversion settings can be varied without training again; rows of such runs say so.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAGE_BLOCK = "adp_ti_animals"
PLACEHOLDER = "<zebra-ti>"
#: the control token: the initial word's row moved as far as the learned token moved, in a random direction
CONTROL = "<random-ti>"
TEMPLATE = "a photo of a {}"


# ----------------------------------------------------------------------------------------------- the latent codec


class _Config(dict):
    """A diffusers-like config: keys readable as attributes."""

    __getattr__ = dict.__getitem__


class SpaceToDepthCodec(nn.Module):
    """The stack's VAE slot filled by a fixed, lossless codec: a [-1, 1] image (B × 3 × H × W, grey repeated) is
    averaged to one channel and 2×2 pixel-unshuffled to B × 4 × H/2 × W/2; decoding shuffles back and repeats the
    channel. ``encode`` returns diffusers' ``latent_dist`` (a deterministic ``DiagonalGaussianDistribution``: std 0,
    so a draw is its mean), ``decode`` a ``.sample``, so ``encode_latents``, ``LatentCache`` and ``decode_latents``
    use it as they use an ``AutoencoderKL``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)
        self.config = _Config(scaling_factor=1.0, latent_channels=4, block_out_channels=(1, 1), in_channels=3,
                              out_channels=3)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def encode(self, images: torch.Tensor):
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        latents = F.pixel_unshuffle(images.mean(dim=1, keepdim=True), 2)
        dist = DiagonalGaussianDistribution(torch.cat([latents, torch.zeros_like(latents)], dim=1), deterministic=True)
        return _Config(latent_dist=dist)

    def decode(self, latents: torch.Tensor):
        return _Config(sample=F.pixel_shuffle(latents, 2).repeat(1, 3, 1, 1))


# ---------------------------------------------------------------------------------------------------------- data


def load_animals(pad: int = 2):
    """Animal-MNIST as float [0, 1] grey N × 1 × 32 × 32 (28×28 padded with background), class ids, the split
    (the project's: stratified, 30 % test, split seed 0) and the class names."""
    import numpy as np

    from anomgen.data.animal_mnist import ANIMAL_CLASSES, AnimalMNIST
    from anomgen.data.digits import stratified_split

    images, labels = AnimalMNIST.load_arrays()
    train, test = stratified_split(labels, 0.3, 0)
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255.0)[:, None]
    x = F.pad(x, (pad, pad, pad, pad))
    return x, torch.from_numpy(labels).long(), torch.from_numpy(train), torch.from_numpy(test), list(ANIMAL_CLASSES)


def subset(index: torch.Tensor, labels: torch.Tensor, per_class: int | None, generator: torch.Generator):
    """``index`` cut to at most ``per_class`` images of each class (a seeded choice), or all of it."""
    if per_class is None:
        return index
    keep = []
    for c in labels[index].unique().tolist():
        members = index[labels[index] == c]
        keep.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(keep).sort().values


def rgb(images: torch.Tensor) -> torch.Tensor:
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


# ---------------------------------------------------------------------------------------------------- classifier


class SmallCNN(nn.Module):
    """Three conv stages (``width``, 2×, 4× channels; batch norm, ReLU, 2×2 max-pool) and a linear head over 10
    classes, on grey 1 × 32 × 32 images in [0, 1]."""

    def __init__(self, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        layers, c_in = [], 1
        for c_out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(c_in * 16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def augment(x: torch.Tensor, generator: torch.Generator, noise: float = 0.0) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 px (the padding's width); with ``noise`` > 0, half the images
    also get Gaussian noise of a σ drawn from U(0, ``noise``) and half (drawn apart) salt, white pixels at a rate
    drawn from U(0, ``noise`` / 6): the grain that a briefly trained generator leaves, so that the classifier
    judges shapes and does not call grain "Zebra" (the one class with texture)."""
    n = len(x)
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
    if noise <= 0:
        return x
    sigma = noise * torch.rand(n, 1, 1, 1, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) < 0.5)
    rate = noise / 6 * torch.rand(n, 1, 1, 1, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) < 0.5)
    salt = (torch.rand(x.shape, generator=generator) < rate).float()
    return (x + sigma * torch.randn(x.shape, generator=generator) + salt).clamp(0, 1)


def train_classifier(x, y, epochs: int, batch: int, lr: float, width: int, generator: torch.Generator,
                     noise: float = 0.0) -> SmallCNN:
    model = SmallCNN(10, width)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            loss = F.cross_entropy(model(augment(x[idx], generator, noise)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def classify(model: nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Class probabilities (N × 10) of [0, 1] images (grey or grey repeated to 3 channels)."""
    grey = images[:, :1]
    return torch.cat([model(grey[i:i + batch]).softmax(-1) for i in range(0, len(grey), batch)])


# --------------------------------------------------------------------------------------------- text-to-image model


def build_stack(args):
    """The project's tiny text-to-image stack at the run's sizes, its VAE slot filled by :class:`SpaceToDepthCodec`."""
    from anomgen.diffusion.text2image import tiny_text_to_image
    from anomgen.encoders.clip_text import load_open_clip

    config = {"embed_dim": args.text_width,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": args.text_width,
                           "heads": args.text_heads, "layers": args.text_layers + 1}}  # the SD conversion drops one
    clip = load_open_clip(f"adp-ti-animals-text-{args.text_width}-{args.text_heads}-{args.text_layers}", None, config,
                          seed=args.seed)
    stack = tiny_text_to_image("sd", resolution=32, prediction_type="epsilon", open_clip_model=clip, seed=args.seed,
                               block_out_channels=tuple(args.unet_channels))
    return dataclasses.replace(stack, vae=SpaceToDepthCodec(), scaling_factor=1.0, latent_factor=2)


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_unet(stack, cache, caption_ids, prompt_states, empty_id: int, args, generator: torch.Generator) -> list:
    """The UNet trained on the cached latents with their captions (``caption_ids`` index ``prompt_states``), a
    caption dropped to the empty one with probability ``--caption-dropout``; the EMA weights replace the UNet's at
    the end. Returns the loss curve (mean per 50 steps)."""
    from anomgen.diffusion.text2image import diffusion_loss

    unet = stack.unet
    unet.train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.unet_lr, betas=(0.9, 0.999), weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, args.unet_warmup, args.unet_steps))
    curve, window = [], []
    for step in range(args.unet_steps):
        idx = torch.randint(0, len(cache), (args.unet_batch,), generator=generator)
        captions = caption_ids[idx].clone()
        captions[torch.rand(len(idx), generator=generator) < args.caption_dropout] = empty_id
        loss = diffusion_loss(stack, cache.mean(idx), prompt_states[captions], generator=generator)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters()):
                e.lerp_(p, 1.0 - decay)
        window.append(float(loss.detach()))
        if len(window) == 50 or step == args.unet_steps - 1:
            curve.append(round(sum(window) / len(window), 5))
            window = []
            if len(curve) % 5 == 0:
                print(f"[adp_ti_animals] UNet step {step + 1}: loss {curve[-1]:.4f}", file=sys.stderr, flush=True)
    stack.unet = ema
    return curve


# ------------------------------------------------------------------------------------------- textual inversion


def learn_token(stack, shots: torch.Tensor, args, generator: torch.Generator):
    """``TextualInversion`` of ``PLACEHOLDER`` from the shots (and their mirror images), diffusers' recipe: only
    the placeholder's row trains, AdamW, the ε-loss of ``"a photo of a <zebra-ti>"``. Returns (the concept, loss
    curve per 25 steps)."""
    from anomgen.diffusion.text2image import LatentCache, diffusion_loss
    from anomgen.diffusion.textual_inversion import TextualInversion

    ti = TextualInversion(stack.tokenizer, stack.text_encoder, PLACEHOLDER, num_vectors=args.ti_vectors,
                          initializer=args.init_word)
    params = ti.freeze_text_encoder()
    opt = torch.optim.AdamW(params, lr=args.ti_lr, betas=(0.9, 0.999), weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.ti_warmup)))
    cache = LatentCache(stack, rgb(torch.cat([shots, shots.flip(-1)])))
    prompt = TEMPLATE.format(PLACEHOLDER)
    stack.unet.eval().requires_grad_(False)
    curve, window = [], []
    for _ in range(args.ti_steps):
        idx = torch.randint(0, len(cache), (args.ti_batch,), generator=generator)
        loss = diffusion_loss(stack, cache.mean(idx), ti.encode([prompt] * len(idx)), generator=generator)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ti.restore_frozen_rows()
        window.append(float(loss.detach()))
        if len(window) == 25:
            curve.append(round(sum(window) / len(window), 5))
            window = []
    if window:
        curve.append(round(sum(window) / len(window), 5))
    ti.text_encoder.requires_grad_(False)
    return ti, curve


@torch.no_grad()
def heldout_losses(stack, images: torch.Tensor, prompts: dict[str, str], draws: int, chunk: int,
                   generator: torch.Generator) -> dict[str, dict]:
    """The ε-loss of ``images`` under each prompt, with the same noise and timesteps (``draws`` per image) for
    every prompt: {name: {"loss": mean, "chunks": per-chunk means}} (the chunks give a paired standard error)."""
    from anomgen.diffusion.text2image import LatentCache, diffusion_loss

    latents = LatentCache(stack, rgb(images)).mean().repeat(draws, 1, 1, 1)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, stack.noise_scheduler.config.num_train_timesteps, (len(latents),),
                              generator=generator)
    out = {}
    for name, prompt in prompts.items():
        states = stack.encode_prompts([prompt])
        chunks = [float(diffusion_loss(stack, latents[i:i + chunk], states.expand(len(latents[i:i + chunk]), -1, -1),
                                       noise=noise[i:i + chunk], timesteps=timesteps[i:i + chunk]))
                  for i in range(0, len(latents), chunk)]
        out[name] = {"loss": sum(chunks) / len(chunks), "chunks": chunks}
    return out


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of the chunk-wise differences a − b."""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    var = sum((v - mean) ** 2 for v in d) / max(1, len(d) - 1)
    return mean, math.sqrt(var / len(d))


# -------------------------------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(stack, prompt: str, n: int, steps: int, guidance: float, batch: int,
             generator: torch.Generator) -> torch.Tensor:
    """``n`` [0, 1] images (n × 3 × 32 × 32) of ``prompt``: DDIM (η = 0) with classifier-free guidance against the
    empty prompt, written out. (Clipping x₀ to the data range, DDIM's ``clip_sample``, made the generations of the
    trained classes grainy and cut the classifier's accuracy on them from 44 % to 8 % in a development run.)"""
    from anomgen.diffusion.text2image import decode_latents

    sampler = stack.sampling_scheduler("DDIMScheduler")
    sampler.set_timesteps(steps)
    cond, uncond = stack.encode_prompts([prompt]), stack.encode_prompts([""])
    size = stack.unet.config.sample_size
    out = []
    for start in range(0, n, batch):
        b = min(batch, n - start)
        x = torch.randn((b, stack.latent_channels, size, size), generator=generator) * sampler.init_noise_sigma
        states = torch.cat([uncond.expand(b, -1, -1), cond.expand(b, -1, -1)])
        for t in sampler.timesteps:
            eps_u, eps_c = stack.unet(torch.cat([x, x]), t, states).sample.chunk(2)
            x = sampler.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
        out.append(decode_latents(stack, x))
    return torch.cat(out)


def save_grid(path: Path, rows: list[tuple[str, torch.Tensor]], scale: int = 2) -> Path:
    """A PNG of labelled rows of [0, 1] images (each row n × C × 32 × 32), ``scale``× nearest-neighbour."""
    from PIL import Image, ImageDraw

    label_w, pad, size = 150, 2, 32 * scale
    cols = max(len(r) for _, r in rows)
    grid = Image.new("L", (label_w + cols * (size + pad), len(rows) * (size + pad)), 255)
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows):
        y = r * (size + pad)
        draw.text((4, y + size // 2 - 6), label, fill=0)
        for c, image in enumerate(images):
            pixels = (image[0].clamp(0, 1) * 255).round().byte().numpy()
            tile = Image.fromarray(pixels).resize((size, size), Image.NEAREST)
            grid.paste(tile, (label_w + c * (size + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)
    return path


# ---------------------------------------------------------------------------------------------------- checkpoints


def _settings_key(args, names: tuple[str, ...]) -> str:
    settings = {n: getattr(args, n) for n in names}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


CLASSIFIER_SETTINGS = ("seed", "classifier_epochs", "classifier_batch", "classifier_lr", "classifier_width",
                       "classifier_noise", "train_per_class")
UNET_SETTINGS = ("seed", "held_out", "text_width", "text_heads", "text_layers", "unet_channels", "unet_steps",
                 "unet_batch", "unet_lr", "unet_warmup", "ema_decay", "caption_dropout", "train_per_class")


def _checkpoint(args, kind: str, names: tuple[str, ...]) -> Path | None:
    if not args.checkpoint_dir:
        return None
    return Path(args.checkpoint_dir) / f"{kind}-{_settings_key(args, names)}.pt"


# ----------------------------------------------------------------------------------------------------------- main


TINY = {"train_per_class": 12, "test_per_class": 10, "classifier_epochs": 1, "classifier_width": 8,
        "text_width": 16, "text_heads": 2, "text_layers": 1, "unet_channels": [8, 16], "unet_steps": 3,
        "unet_batch": 8, "unet_warmup": 1, "ti_steps": 3, "ti_batch": 4, "ti_warmup": 1, "n": 6,
        "n_per_class": 2, "ddim_steps": 2, "eval_images": 8, "eval_draws": 1, "eval_chunk": 4}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held-out", default="Zebra", help="the class the text-to-image model never sees")
    parser.add_argument("--init-word", default="horse", help="the word the token starts from")
    parser.add_argument("--shots", type=int, default=8, help="K: training images of the held-out class for TI")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; on a 2-core CPU shared with other jobs, 2 threads made a UNet step 7× "
                             "slower than 1 (15 s vs 2 s: oversubscribed threads wait on each other)")
    parser.add_argument("--train-per-class", type=int, default=None, help="cut the training split (default: all)")
    parser.add_argument("--test-per-class", type=int, default=None, help="cut the test split (default: all)")
    # classifier
    parser.add_argument("--classifier-epochs", type=int, default=8)
    parser.add_argument("--classifier-batch", type=int, default=128)
    parser.add_argument("--classifier-lr", type=float, default=3e-3)
    parser.add_argument("--classifier-width", type=int, default=32)
    parser.add_argument("--classifier-noise", type=float, default=0.3,
                        help="grain augmentation of the classifier's training images (0: flips and shifts only)")
    # text-to-image model
    parser.add_argument("--text-width", type=int, default=64)
    parser.add_argument("--text-heads", type=int, default=4)
    parser.add_argument("--text-layers", type=int, default=2, help="layers of the SD-style text encoder")
    parser.add_argument("--unet-channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--unet-steps", type=int, default=1500)
    parser.add_argument("--unet-batch", type=int, default=64)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--unet-warmup", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    # textual inversion
    parser.add_argument("--ti-vectors", type=int, default=1)
    parser.add_argument("--ti-steps", type=int, default=500)
    parser.add_argument("--ti-batch", type=int, default=16)
    parser.add_argument("--ti-lr", type=float, default=5e-3)
    parser.add_argument("--ti-warmup", type=int, default=50)
    # evaluation
    parser.add_argument("--eval-images", type=int, default=200, help="held-out test images per class for the loss")
    parser.add_argument("--eval-draws", type=int, default=2, help="noise / timestep draws per image for the loss")
    parser.add_argument("--eval-chunk", type=int, default=25)
    parser.add_argument("--n", type=int, default=200, help="generations from the token's and the word's prompts")
    parser.add_argument("--n-per-class", type=int, default=64, help="generations per trained class")
    parser.add_argument("--ddim-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--sample-batch", type=int, default=100)
    parser.add_argument("--grid-class", default="Giraffe", help="the trained class shown in the grid's last row")
    # outputs
    parser.add_argument("--tiny", action="store_true", help="toy sizes for a smoke test (seconds)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "adp_ti_animals.jsonl"))
    parser.add_argument("--grid", default=str(ROOT / "docs" / "results" / "adp_ti_animals.png"))
    parser.add_argument("--checkpoint-dir", default=None, help="development aid: keep / reuse classifier and UNet")
    parser.add_argument("--doc", default=None, help="a page of docs/results/ whose block this run's tables rewrite")
    args = parser.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    load_before = os.getloadavg()
    t_all, cpu_all = time.perf_counter(), time.process_time()
    cpu_mark = [cpu_all]

    def timed(name: str, t0: float) -> None:
        seconds[name] = round(time.perf_counter() - t0, 2)
        cpu_seconds[name] = round(time.process_time() - cpu_mark[0], 2)
        cpu_mark[0] = time.process_time()
        print(f"[adp_ti_animals] {name}: {seconds[name]:.1f} s wall, {cpu_seconds[name]:.1f} s CPU (all threads)",
              file=sys.stderr, flush=True)

    # 1. data
    t0 = time.perf_counter()
    x, y, train, test, classes = load_animals()
    if args.held_out not in classes:
        raise SystemExit(f"--held-out {args.held_out!r} is not an Animal-MNIST class ({', '.join(classes)})")
    held = classes.index(args.held_out)
    train = subset(train, y, args.train_per_class, torch.Generator().manual_seed(args.seed))
    test = subset(test, y, args.test_per_class, torch.Generator().manual_seed(args.seed + 1))
    held_train = train[y[train] == held]
    shots_index = held_train[torch.randperm(len(held_train), generator=torch.Generator().manual_seed(args.seed))
                             [:args.shots]]
    trained_classes = [c for c in classes if c != args.held_out]
    timed("data", t0)

    # 2. classifier (all ten classes)
    t0 = time.perf_counter()
    path = _checkpoint(args, "classifier", CLASSIFIER_SETTINGS)
    reused = {"classifier": bool(path and path.is_file())}
    if reused["classifier"]:
        classifier = SmallCNN(10, args.classifier_width)
        classifier.load_state_dict(torch.load(path, weights_only=True))
        classifier.eval()
    else:
        classifier = train_classifier(x[train], y[train], args.classifier_epochs, args.classifier_batch,
                                      args.classifier_lr, args.classifier_width, torch.Generator().manual_seed(1),
                                      args.classifier_noise)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(classifier.state_dict(), path)
    test_pred = classify(classifier, x[test]).argmax(-1)
    test_acc = float((test_pred == y[test]).float().mean())
    per_class_test = {c: float((test_pred[y[test] == i] == i).float().mean()) for i, c in enumerate(classes)}
    timed("classifier", t0)

    # 3. text-to-image model on the nine other classes
    t0 = time.perf_counter()
    from anomgen.diffusion.text2image import LatentCache
    from anomgen.diffusion.textual_inversion import TextualInversion

    stack = build_stack(args)
    ldm_index = train[y[train] != held]
    ldm_images = torch.cat([x[ldm_index], x[ldm_index].flip(-1)])  # mirror images: animals face both ways
    caption_ids = torch.tensor([trained_classes.index(classes[int(c)]) for c in y[ldm_index]]).repeat(2)
    prompts = [TEMPLATE.format(c.lower()) for c in trained_classes] + [""]
    with torch.no_grad():
        prompt_states = stack.encode_prompts(prompts)
    cache = LatentCache(stack, rgb(ldm_images), batch_size=1024)
    path = _checkpoint(args, "unet", UNET_SETTINGS)
    reused["unet"] = bool(path and path.is_file())
    curve = []
    if reused["unet"]:
        stack.unet.load_state_dict(torch.load(path, weights_only=True))
    else:
        curve = train_unet(stack, cache, caption_ids, prompt_states, len(prompts) - 1, args,
                           torch.Generator().manual_seed(args.seed + 2))
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(stack.unet.state_dict(), path)
    stack.unet.eval().requires_grad_(False)
    timed("text_to_image", t0)

    # 4. textual inversion from K shots of the held-out class
    t0 = time.perf_counter()
    shots = x[shots_index]
    ti, ti_curve = learn_token(stack, shots, args, torch.Generator().manual_seed(args.seed + 3))
    init_id = stack.tokenizer(args.init_word, add_special_tokens=False).input_ids
    initial = stack.text_encoder.get_input_embeddings().weight.detach()[init_id].float().mean(0)
    learned = ti.learned_embeddings()
    moved = (learned - initial).norm(dim=-1)
    drift = float((moved / initial.norm()).mean())
    # the control: the initial word moved as far as the token moved, in a random direction
    direction = torch.randn(learned.shape, generator=torch.Generator().manual_seed(args.seed + 6))
    control = TextualInversion(stack.tokenizer, stack.text_encoder, CONTROL, num_vectors=args.ti_vectors,
                               initializer=initial + moved[:, None] * direction / direction.norm(dim=-1, keepdim=True))
    timed("textual_inversion", t0)

    # 5. held-out denoising loss
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed + 4)
    token_prompt, word_prompt = TEMPLATE.format(PLACEHOLDER), TEMPLATE.format(args.init_word)
    control_prompt = TEMPLATE.format(control.placeholder)
    loss_prompts = {"empty": "", "word": word_prompt, "token": token_prompt, "random": control_prompt}
    init_class = next((c for c in trained_classes if c.lower() == args.init_word.lower()), None)
    # the shots (what the token was trained on, more draws each), then test images of the held-out class and of
    # the initial word's class
    eval_sets = {f"{args.held_out} shots": (shots, args.eval_draws * 8),
                 args.held_out: (x[test[y[test] == held][:args.eval_images]], args.eval_draws)}
    if init_class is not None:
        members = test[y[test] == classes.index(init_class)][:args.eval_images]
        eval_sets[init_class] = (x[members], args.eval_draws)
    losses = {}
    for name, (images_, draws) in eval_sets.items():
        raw = heldout_losses(stack, images_, loss_prompts, draws, args.eval_chunk, gen)
        diff, se = paired(raw["token"]["chunks"], raw["word"]["chunks"])
        losses[name] = {**{k: round(v["loss"], 5) for k, v in raw.items()}, "token_minus_word": round(diff, 5),
                        "token_minus_word_se": round(se, 5), "images": len(images_), "draws": draws}
    timed("heldout_loss", t0)

    # 6. generation and the classifier's calls
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed + 5)
    sample = dict(steps=args.ddim_steps, guidance=args.guidance, batch=args.sample_batch, generator=gen)
    images = {"token": generate(stack, token_prompt, args.n, **sample),
              "word": generate(stack, word_prompt, args.n, **sample),
              "random": generate(stack, control_prompt, args.n, **sample)}
    calls = {}
    for key in ("token", "word", "random"):
        probs = classify(classifier, images[key])
        pred = probs.argmax(-1)
        calls[key] = {"n": len(pred), "held_out_share": float((pred == held).float().mean()),
                      "mean_p_held_out": float(probs[:, held].mean()),
                      "shares": {c: float((pred == i).float().mean()) for i, c in enumerate(classes)}}
    per_class_gen = {}
    for c in trained_classes:
        generated = generate(stack, TEMPLATE.format(c.lower()), args.n_per_class, **sample)
        pred = classify(classifier, generated).argmax(-1)
        per_class_gen[c] = {"accuracy": float((pred == classes.index(c)).float().mean()),
                            "held_out_share": float((pred == held).float().mean())}
        if c == args.grid_class:
            images["grid_class"] = generated
    timed("generation", t0)

    grid = None
    if args.grid:
        cols = 10
        rows = [(f"{args.held_out} shots (real)", shots[:cols]), (f"'{token_prompt}'", images["token"][:cols]),
                (f"'{word_prompt}'", images["word"][:cols])]
        if "grid_class" in images:
            rows.append((f"'{TEMPLATE.format(args.grid_class.lower())}'", images["grid_class"][:cols]))
        rows.append(("random direction (control)", images["random"][:cols]))
        grid = str(save_grid(Path(args.grid), rows))

    seconds["total"] = round(time.perf_counter() - t_all, 2)
    cpu_seconds["total"] = round(time.process_time() - cpu_all, 2)
    settings = {k: getattr(args, k) for k in (
        "held_out", "init_word", "shots", "seed", "threads", "train_per_class", "test_per_class",
        "classifier_epochs", "classifier_width", "text_width", "text_heads", "text_layers", "unet_channels",
        "unet_steps", "unet_batch", "unet_lr", "ema_decay", "caption_dropout", "ti_vectors", "ti_steps",
        "ti_batch", "ti_lr", "ti_warmup", "eval_images", "eval_draws", "n", "n_per_class", "ddim_steps",
        "guidance", "eval_chunk", "classifier_noise", "tiny")}
    row = {
        "name": "adp_ti_animals", "device": "cpu", "settings": settings, "reused": reused,
        "classifier": {"test_accuracy": test_acc, "per_class": per_class_test, "test_images": len(test)},
        "text_to_image": {"unet_parameters": sum(p.numel() for p in stack.unet.parameters()),
                          "text_encoder_parameters": sum(p.numel() for p in stack.text_encoder.parameters()),
                          "train_images": len(ldm_images), "loss_curve_per_50_steps": curve},
        "generation_accuracy": {"mean": sum(v["accuracy"] for v in per_class_gen.values()) / len(per_class_gen),
                                "per_class": per_class_gen, "n_per_class": args.n_per_class},
        "textual_inversion": {"loss_curve_per_25_steps": ti_curve, "relative_drift": drift,
                              "shots": [int(i) for i in shots_index]},
        "heldout_loss": losses, "calls": calls, "grid": grid,
        "seconds": seconds, "cpu_seconds": cpu_seconds, "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    print(json.dumps(row))
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        with open(args.results, "a") as f:
            f.write(json.dumps(row) + "\n")
    if args.doc:
        write_doc_block(args, row, argv)
    return row


def doc_body(row: dict, page: Path | None = None) -> str:
    """The block's text: the claim's table, the trained classes' table, the held-out losses, settings and costs."""
    from docpage import table

    s, calls, held = row["settings"], row["calls"], row["settings"]["held_out"]
    word, token = f"a photo of a {s['init_word']}", f"a photo of a {PLACEHOLDER}"
    init_class = next((c for c in row["classifier"]["per_class"] if c.lower() == s["init_word"].lower()), None)

    def pct(v: float) -> str:
        return f"{100 * v:.1f} %"

    header = ["prompt", "N", f"called {held}", "mean P(" + held + ")"]
    if init_class:
        header.append(f"called {init_class}")
    lines = []
    for key, prompt in (("token", f"`{token}` (learned)"), ("word", f"`{word}` (initial word)"),
                        ("random", f"`a photo of a {CONTROL}` (control: moved as far, random direction)")):
        c = calls[key]
        cells = [prompt, c["n"], pct(c["held_out_share"]), f"{c['mean_p_held_out']:.3f}"]
        if init_class:
            cells.append(pct(c["shares"][init_class]))
        lines.append(cells)
    parts = [table(header, lines)]
    gen = row["generation_accuracy"]
    per = gen["per_class"]
    parts.append(table(["", *per, "mean"],
                       [[f"generations called their class (N = {gen['n_per_class']} each)",
                         *(pct(v["accuracy"]) for v in per.values()), pct(gen["mean"])],
                        [f"generations called {held}", *(pct(v["held_out_share"]) for v in per.values()),
                         pct(sum(v["held_out_share"] for v in per.values()) / len(per))],
                        ["classifier on real test images", *(pct(row["classifier"]["per_class"][c]) for c in per),
                         pct(row["classifier"]["test_accuracy"]) + " (all 10)"]]))
    loss_rows = []
    for name, v in row["heldout_loss"].items():
        what = (f"the {v['images']} shots (trained on; {v['draws']} draws each)" if name.endswith(" shots")
                else f"{name} test images ({v['images']}; {v['draws']} draws each)")
        loss_rows.append([what, f"{v['empty']:.4f}", f"{v['word']:.4f}", f"{v['token']:.4f}", f"{v['random']:.4f}",
                          f"{v['token_minus_word']:+.4f} ± {v['token_minus_word_se']:.4f}"])
    parts.append(table(["ε-loss of", "empty prompt", "initial word", "learned token", "control",
                        "token − word (± s.e.)"], loss_rows))
    sec = row["seconds"]
    reused = [k for k, v in row["reused"].items() if v]
    costs = (f"Seconds: classifier {sec['classifier']:.0f}, text-to-image training {sec['text_to_image']:.0f}, "
             f"textual inversion {sec['textual_inversion']:.0f}, held-out loss {sec['heldout_loss']:.0f}, generation "
             f"{sec['generation']:.0f}; total {sec['total']:.0f} s ({sec['total'] / 60:.1f} min; "
             f"{row['cpu_seconds']['total'] / 60:.1f} CPU-min) on {s['threads']} thread(s) of a 2-core CPU shared "
             f"with other jobs (load average {row['loadavg_before'][0]:.1f} before, {row['loadavg_after'][0]:.1f} "
             "after), so the times are inflated"
             + (f"; reused from a checkpoint: {', '.join(reused)}" if reused else "") + ".")
    ti_line = (f"The token moved {row['textual_inversion']['relative_drift']:.2f}× the norm of `{s['init_word']}`'s "
               f"row; the control is `{s['init_word']}`'s row moved as far in a random direction. The loss table "
               "uses the same noise and timesteps for every prompt; the standard error is over chunks of "
               f"{s['eval_chunk']} paired draws.")
    if row.get("grid") and page is not None:
        rel = os.path.relpath(row["grid"], page.resolve().parent)
        parts.append(f"![shots and generations]({rel})")
    return "\n\n".join([*parts, ti_line, costs])


def write_doc_block(args, row: dict, argv) -> None:
    from docpage import DOCS, write_doc

    s = row["settings"]
    page = Path(args.doc)
    if not page.is_file() and not page.is_absolute() and (DOCS / page).is_file():
        page = DOCS / page
    note = (f"{s['held_out']} held out of the text-to-image model; the token learned from K = {s['shots']} of its "
            f"training images, initialised from `{s['init_word']}`. UNet {tuple(s['unet_channels'])} "
            f"({row['text_to_image']['unet_parameters'] / 1e6:.2f} M parameters), {s['unet_steps']} steps of "
            f"{s['unet_batch']} (lr {s['unet_lr']:g}, EMA {s['ema_decay']}), frozen random CLIP text encoder "
            f"(width {s['text_width']}, {s['text_layers']} layers), space-to-depth latent; TI {s['ti_vectors']} "
            f"vector, {s['ti_steps']} steps of {s['ti_batch']}, lr {s['ti_lr']:g}; DDIM {s['ddim_steps']} steps, "
            f"guidance {s['guidance']:g}; seed {s['seed']}.")
    write_doc(page, PAGE_BLOCK, "adp_ti_animals.py", sys.argv[1:] if argv is None else argv, doc_body(row, page),
              note)


if __name__ == "__main__":
    main()
