"""``model=sdedit``: ADP's SDEdit pseudo-anomalies from the support set (inference only; the algorithm and its
hyperparameters are :mod:`anomgen.generators.sdedit`).

``python train.py model=sdedit`` skips fitting and runs prediction with the export callback. Request ``i`` edits its
source image (``support[i % len(support)]``) with prompt ``prompts[i % len(prompts)]`` (``{class}`` replaced by the
sample's category); every random draw of sample ``i`` (crop box, posterior sample, noise) comes from
``sample_generator(seed, i)``, so the set is the same on 1 or N devices and with any batch size. Images are resized to
the stack's generation size (``image_size``, default the UNet's latent size × the VAE's downsampling), edited, and the
random resized crop is resized to the task's image size. The set has no masks (see the generator's docstring).

The text-to-image stack is injected: ``stack`` is any object with ``unet``, ``vae``, ``scheduler``, ``text_encoder``
and ``tokenizer`` (Hydra builds it from ``pretrained.text_to_image``). Prompts become embeddings in one place,
:func:`encode_prompts`, to be swapped for a concept-aware encoder (ADP's learned tokens).

:func:`load_stack` and :func:`tiny_stack` are stand-ins for the project's text-to-image loader
(``anomgen.diffusion.text2image``, written in parallel): they return a :class:`Stack` with the same attribute names.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from anomgen.data.generation import GeneratedBatch
from anomgen.generators.sdedit import SDEditGenerator
from anomgen.pixels import resize
from anomgen.seeding import sample_generator

#: ADP's prompts for the first pseudo-anomalies (METHODS.md §3)
DEFAULT_PROMPTS = ("a photo with damage", "a photo of an object with damage")
CLASS_PLACEHOLDER = "{class}"


@torch.no_grad()
def encode_prompts(stack: Any, prompts: Sequence[str]) -> torch.Tensor:
    """N prompts -> N × L × d text embeddings: ``stack.tokenizer`` (padded to its ``model_max_length``, truncated),
    then ``stack.text_encoder(input_ids)[0]`` (the last hidden state), as diffusers' Stable Diffusion pipelines encode
    a prompt. The one place where SDEdit's prompts become embeddings."""
    tokenizer = stack.tokenizer
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    device = next(stack.text_encoder.parameters()).device
    return stack.text_encoder(ids.to(device))[0]


class SDEditModel(LightningModule):
    trainable = False  # train.py skips Trainer.fit
    generates = True  # train.py runs Trainer.predict with the export callback

    def __init__(self, stack: Any, prompts: Sequence[str] | str = DEFAULT_PROMPTS, negative_prompt: str = "",
                 image_size: int | Sequence[int] | None = None, seed: int = 0, **sdedit) -> None:
        """``stack``: the text-to-image stack (see the module docstring); ``prompts``: cycled over the samples;
        ``negative_prompt``: the unconditional prompt of classifier-free guidance; ``image_size``: the generation
        size (int or (H, W), multiples of the VAE's downsampling); ``sdedit``: the generator's settings
        (strength, num_inference_steps, guidance_scale, eta, crop, crop_scale, crop_ratio,
        :class:`~anomgen.generators.sdedit.SDEditConfig`, with its defaults)."""
        super().__init__()
        prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
        if not prompts:
            raise ValueError("model.prompts: give at least one prompt")
        self.save_hyperparameters(ignore=["stack"])
        self.stack = stack
        self.generator = SDEditGenerator(stack, **sdedit)
        self.generator_name = self.generator.name
        self.prompts, self.negative_prompt, self.seed = prompts, negative_prompt, seed
        self.image_size = _size(image_size) if image_size is not None else _stack_size(stack)
        self._embeddings: dict[str, torch.Tensor] = {}

    def sample_prompts(self, indices: Sequence[int], categories: Sequence[str]) -> list[str]:
        """The prompt of each sample: ``prompts[index % len(prompts)]``, ``{class}`` replaced by its category."""
        return [self.prompts[i % len(self.prompts)].replace(CLASS_PLACEHOLDER, str(c))
                for i, c in zip(indices, categories)]

    def embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """len(texts) × L × d; each distinct text is encoded once (:func:`encode_prompts`) and kept."""
        new = [t for t in dict.fromkeys(texts) if t not in self._embeddings]
        if new:
            for text, embeds in zip(new, encode_prompts(self.stack, new)):
                self._embeddings[text] = embeds
        return torch.stack([self._embeddings[t] for t in texts])

    def on_predict_start(self) -> None:
        """The stack is no submodule (its weights stay out of checkpoints): move it to the model's device here."""
        for name in ("unet", "vae", "text_encoder"):
            part = getattr(self.stack, name, None)
            if isinstance(part, torch.nn.Module):
                part.to(self.device)
        self._embeddings = {}

    def predict_step(self, batch: dict, batch_idx: int) -> GeneratedBatch:
        source = batch["source"]
        indices = batch["index"].tolist()
        categories = [str(c) for c in source["category"]]
        texts = self.sample_prompts(indices, categories)
        images = source["image"]
        task_size = tuple(images.shape[-2:])
        out, params = self.generator(resize(images, self.image_size), self.embeddings(texts),
                                     self.embeddings([self.negative_prompt]), [sample_generator(self.seed, i)
                                                                               for i in indices],
                                     size=task_size, prompts=texts)
        return GeneratedBatch(
            index=batch["index"],
            image=out,
            mask=None,  # SDEdit re-renders the whole image: where the damage is, nobody knows
            label=torch.ones(len(indices), dtype=torch.long),
            generator=self.generator_name,
            category=categories,
            defect_type=[self.generator_name] * len(indices),
            sources=[[p] for p in source["image_path"]],
            params=[{**p, "negative_prompt": self.negative_prompt, "seed": self.seed,
                     "image_size": list(self.image_size)} for p in params],
        )


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _stack_size(stack: Any) -> tuple[int, int]:
    """The UNet's latent sample size × the VAE's downsampling (2 per VAE block after the first)."""
    sample = stack.unet.config.sample_size
    factor = 2 ** (len(stack.vae.config.block_out_channels) - 1)
    height, width = _size(sample)
    return height * factor, width * factor


# --- stand-ins for the project's text-to-image loader (anomgen.diffusion.text2image) ------------------------------

@dataclass
class Stack:
    """A Stable-Diffusion stack: the attributes SDEdit and :func:`encode_prompts` read."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any


def _swap_scheduler(scheduler: Any, name: str | None) -> Any:
    if name is None:
        return scheduler
    import diffusers

    return getattr(diffusers, name).from_config(scheduler.config)


def load_stack(source: str, scheduler: str | None = None) -> Stack:
    """A diffusers Stable Diffusion folder or hub id (``anomgen.pretrained.resolve``: local path,
    ``$ANOMGEN_PRETRAINED_DIR/<id>``, the HF cache), frozen, with its scheduler swapped for the diffusers class named
    ``scheduler`` (e.g. ``DDIMScheduler``; its config from the model's)."""
    from diffusers import StableDiffusionPipeline

    from anomgen.pretrained import resolve

    pipe = StableDiffusionPipeline.from_pretrained(str(resolve(source)), safety_checker=None,
                                                   requires_safety_checker=False)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.eval().requires_grad_(False)
    return Stack(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, _swap_scheduler(pipe.scheduler, scheduler))


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible map of the 256 bytes to printable characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def clip_tokenizer(folder: str | Path | None = None, model_max_length: int = 77):
    """A transformers ``CLIPTokenizer`` built offline from open_clip's shipped BPE vocabulary (the CLIP / OpenCLIP
    vocabulary of 49408 tokens; pad token "!" as in Stable Diffusion 2), its vocab.json and merges.txt written to
    ``folder`` (a temporary folder when None) the first time."""
    import importlib.util

    from transformers import CLIPTokenizer

    folder = Path(tempfile.mkdtemp(prefix="clip-tokenizer-") if folder is None else folder)
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        spec = importlib.util.find_spec("open_clip")
        bpe = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
        merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        symbols = list(_bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in (("merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n"),
                           ("vocab.json", json.dumps({s: i for i, s in enumerate(vocab)}))):
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=folder, delete=False) as part:
                part.write(text)  # written whole, then renamed: a parallel run never reads half a file
            Path(part.name).replace(folder / name)
    return CLIPTokenizer.from_pretrained(str(folder), pad_token="!", model_max_length=model_max_length)


#: Stable Diffusion's training schedule (scaled-linear betas 0.00085 -> 0.012 over 1000 steps)
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def tiny_stack(image_size: int = 32, scheduler: str = "DDIMScheduler", prediction_type: str = "epsilon",
               tokenizer_dir: str | Path | None = None, seed: int = 0) -> Stack:
    """A tiny random Stable-Diffusion stack of the same families (UNet2DConditionModel, AutoencoderKL with 2× latent
    downsampling, CLIPTextModel of width 32 over the real CLIP vocabulary, the offline CLIP tokenizer, a diffusers
    scheduler with SD's betas), built offline in about a second; ``image_size`` pixels -> ``image_size / 2`` latents.
    The weights depend only on ``seed`` (torch's global generator is left as it was)."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if image_size % 2:
        raise ValueError(f"tiny_stack: image_size must be even (2× latent downsampling), got {image_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=image_size // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32),
            layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=4,
            norm_num_groups=8)
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            latent_channels=4, norm_num_groups=8, sample_size=image_size)
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                                    num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
                                                    projection_dim=32))
    for part in (unet, vae, text_encoder):
        part.eval().requires_grad_(False)
    kwargs = {**SD_BETAS, "prediction_type": prediction_type, "steps_offset": 1}  # SD's scheduler configs
    if scheduler in ("DDIMScheduler", "DDPMScheduler"):
        kwargs["clip_sample"] = False
    if scheduler == "DDIMScheduler":
        kwargs["set_alpha_to_one"] = False
    if scheduler == "PNDMScheduler":
        kwargs["skip_prk_steps"] = True
    return Stack(unet, vae, text_encoder, clip_tokenizer(tokenizer_dir), getattr(diffusers, scheduler)(**kwargs))
