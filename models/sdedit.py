"""``model=sdedit``: ADP's SDEdit pseudo-anomalies from the support set (inference only; the algorithm and its
hyperparameters are :mod:`anomgen.generators.sdedit`).

``python train.py model=sdedit`` skips fitting and runs prediction with the export callback. Request ``i`` edits its
source image (``support[i % len(support)]``) with prompt ``prompts[i % len(prompts)]`` (``{class}`` replaced by the
sample's category); every random draw of sample ``i`` (crop box, posterior sample, noise) comes from
``sample_generator(seed, i)``, so the set is the same on 1 or N devices and with any batch size. Images are resized to
the stack's generation size (``image_size``, default the UNet's latent size × the VAE's downsampling), edited, and the
random resized crop is resized to the task's image size. The set has no masks (see the generator's docstring).

The text-to-image stack is ``pretrained.text_to_image`` (:func:`~anomgen.diffusion.text2image.build_text_to_image`;
``debug=tiny``: a tiny random one whose text encoder is converted from ``pretrained.adp_clip``), sampled with the
scheduler named by ``scheduler``. ``concept``: a learned-concept file (an ADP concept stage's ``concept`` output) added
to the stack's tokenizer and text encoder, so that prompts may name its placeholder ("a photo of a damaged <c_a>").
Prompts become embeddings in one place, :func:`encode_prompts`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule

from anomgen.data.generation import GeneratedBatch
from anomgen.errors import ConfigError
from anomgen.generators.sdedit import SDEditGenerator
from anomgen.pixels import resize
from anomgen.seeding import sample_generator

#: ADP's prompts for the first pseudo-anomalies (METHODS.md §3)
DEFAULT_PROMPTS = ("a photo with damage", "a photo of an object with damage")
CLASS_PLACEHOLDER = "{class}"


@dataclass
class EditStack:
    """What SDEdit runs: the text-to-image stack's parts with the sampling scheduler, and the concept (if any) its
    prompts may name."""

    unet: Any
    vae: Any
    scheduler: Any
    text_encoder: Any
    tokenizer: Any
    scaling_factor: float
    concept: Any = None  # a TextualInversion added to tokenizer and text_encoder


def build_edit_stack(text_to_image: Mapping, clip: Mapping | None = None, concept: str | None = None,
                     scheduler: str | None = "DDIMScheduler") -> EditStack:
    """The stack of a ``pretrained.text_to_image`` entry, its sampling scheduler, and the concept file ``concept``
    loaded into its tokenizer and text encoder. ``clip`` (a ``pretrained.adp_clip`` entry) is used only by a tiny stack
    (``source: null``): its text encoder is converted from that open_clip model, as ADP's classifier shares it."""
    from anomgen.diffusion.text2image import build_with_classifier
    from anomgen.diffusion.textual_inversion import TextualInversion

    stack, _ = build_with_classifier(text_to_image, clip, need_classifier=False)
    learned = TextualInversion.load(concept, stack.tokenizer, stack.text_encoder) if concept else None
    return EditStack(unet=stack.unet, vae=stack.vae,
                     scheduler=stack.sampling_scheduler(scheduler) if scheduler else stack.noise_scheduler,
                     text_encoder=stack.text_encoder, tokenizer=stack.tokenizer, scaling_factor=stack.scaling_factor,
                     concept=learned)


@torch.no_grad()
def encode_prompts(stack: Any, prompts: Sequence[str]) -> torch.Tensor:
    """N prompts -> N × L × d text embeddings, as diffusers' Stable Diffusion pipelines encode a prompt: token ids
    padded to the tokenizer's ``model_max_length``, then the text encoder's last hidden state. With a learned concept
    (``stack.concept``), its placeholder is expanded to its vectors and a prompt that then no longer fits is an error;
    without one, longer prompts are truncated as the pipelines do. The one place where SDEdit's prompts become
    embeddings."""
    concept = getattr(stack, "concept", None)
    if concept is not None:
        return concept.encode(list(prompts))
    tokenizer = stack.tokenizer
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    device = next(stack.text_encoder.parameters()).device
    return stack.text_encoder(ids.to(device))[0]


class SDEditModel(LightningModule):
    trainable = False  # train.py skips Trainer.fit
    generates = True  # train.py runs Trainer.predict with the export callback

    def __init__(self, text_to_image: Mapping | EditStack, clip: Mapping | None = None, concept: str | None = None,
                 scheduler: str | None = "DDIMScheduler", prompts: Sequence[str] | str = DEFAULT_PROMPTS,
                 negative_prompt: str = "", image_size: int | Sequence[int] | None = None, seed: int = 0,
                 **sdedit) -> None:
        """``text_to_image``, ``clip``, ``concept``, ``scheduler``: :func:`build_edit_stack`'s arguments (or a built
        :class:`EditStack` as ``text_to_image``); ``prompts``: cycled over the samples;
        ``negative_prompt``: the unconditional prompt of classifier-free guidance; ``image_size``: the generation
        size (int or (H, W), multiples of the VAE's downsampling); ``sdedit``: the generator's settings
        (strength, num_inference_steps, guidance_scale, eta, crop, crop_scale, crop_ratio,
        :class:`~anomgen.generators.sdedit.SDEditConfig`, with its defaults)."""
        super().__init__()
        prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
        if not prompts:
            raise ConfigError("model.prompts: give at least one prompt")
        stack = (text_to_image if isinstance(text_to_image, EditStack)
                 else build_edit_stack(text_to_image, clip, concept, scheduler))
        self.save_hyperparameters(ignore=["text_to_image"] if isinstance(text_to_image, EditStack) else None)
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
