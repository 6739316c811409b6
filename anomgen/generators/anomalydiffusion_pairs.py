"""AnomalyDiffusion's image–mask pairs (METHODS.md §4): which defect type and which normal image each request gets,
and the generation of a batch of requests from a trained anomaly embedding and mask model.

- :class:`AnomalyDiffusionPlan`: request ``i`` has defect type ``types[i % T]`` (the types cycled, so
  ``num_per_type`` of each, the code: about 500, the paper: 1000) and a random normal image of the support set (the
  training ``good`` images) drawn from sample ``i``'s ``normal`` stream. A pure function of the support set.
- :func:`generate_pairs`: for each request, a mask from the mask model
  (:func:`~anomgen.generators.anomalydiffusion_masks.sample_masks`, from its ``mask`` stream, judged on the
  generator's latent grid and at the set's image size), then :func:`~anomgen.generators.anomalydiffusion.
  blended_generate` of the type in that mask of the normal image (its ``blend`` stream), at the stack's resolution;
  images and masks are resized to the set's size last.

Every random draw of sample ``i`` comes from one of three generators seeded by ``(seed, i)`` (:func:`sample_streams`),
so a sample is the same whatever batch or device makes it. Its mask is exactly the same (each mask is drawn alone);
its image may differ in the last bits, as batched UNet passes do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from anomgen.diffusion.text2image import TextToImageStack, latent_mask
from anomgen.generators.anomalydiffusion import AnomalyEmbedding, blended_generate
from anomgen.generators.anomalydiffusion_masks import MaskEmbedding, sample_masks
from anomgen.pixels import resize
from anomgen.seeding import sample_generator, sample_seed

#: the random streams of one sample, in this order of their seeds
STREAMS = ("normal", "mask", "blend")


def stream_seeds(seed: int, index: int) -> dict[str, int]:
    """The seeds of sample ``index``'s streams (recorded in the set's params)."""
    base = sample_seed(seed, index)
    return {name: sample_seed(base, k) for k, name in enumerate(STREAMS)}


def sample_streams(seed: int, index: int, device: torch.device | str = "cpu") -> dict[str, torch.Generator]:
    """Sample ``index``'s generators: ``normal`` (which normal image), ``mask`` (the mask model's draws), ``blend``
    (blended generation's draws)."""
    base = sample_seed(seed, index)
    return {name: sample_generator(base, k, device) for k, name in enumerate(STREAMS)}


class AnomalyDiffusionPlan(Dataset):
    """The requests of an AnomalyDiffusion set: ``num_per_type`` × T, request ``i`` = ``{"index": i, "type_id":
    i % T, "normal": support[j]}`` with ``j`` uniform over the support set from sample ``i``'s ``normal`` stream."""

    def __init__(self, support: Dataset, type_names: Sequence[str], num_per_type: int, seed: int = 0) -> None:
        if len(support) == 0:
            raise ValueError("anomalydiffusion: the support set (the normal training images) is empty")
        if int(num_per_type) < 1:
            raise ValueError(f"anomalydiffusion: num_per_type must be >= 1, got {num_per_type}")
        if not type_names:
            raise ValueError("anomalydiffusion: no defect types to generate")
        self.support, self.type_names = support, [str(t) for t in type_names]
        self.num_per_type, self.seed = int(num_per_type), int(seed)

    def __len__(self) -> int:
        return self.num_per_type * len(self.type_names)

    def type_id(self, index: int) -> int:
        return int(index) % len(self.type_names)

    def normal_position(self, index: int) -> int:
        """The support position of request ``index``'s normal image (one draw of its ``normal`` stream)."""
        generator = sample_streams(self.seed, index)["normal"]
        return int(torch.randint(len(self.support), (1,), generator=generator))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return {"index": index, "type_id": self.type_id(index), "normal": self.support[self.normal_position(index)]}


@dataclass
class Pairs:
    """:func:`generate_pairs`' result: ``images`` B × 3 × H × W in [0, 1] and ``masks`` B × H × W {0, 1} at the
    set's size, ``params`` one dict per sample (what made it)."""

    images: torch.Tensor
    masks: torch.Tensor
    params: list[dict]


def generate_pairs(stack: TextToImageStack, embedding: AnomalyEmbedding, mask_model: MaskEmbedding,
                   normal_images: torch.Tensor, type_names: Sequence[str], indices: Sequence[int], seed: int, *,
                   generation: Mapping, masks: Mapping, size: tuple[int, int] | None = None) -> Pairs:
    """Pairs for requests ``indices`` of defect types ``type_names`` on ``normal_images`` (B × 3 × h × w in [0, 1]).

    ``generation``: :func:`~anomgen.generators.anomalydiffusion.blended_generate`'s settings (steps, eta, aar,
    final_blend, guidance_scale, templates, dilation_factor); ``masks``:
    :func:`~anomgen.generators.anomalydiffusion_masks.sample_masks`' (steps, eta, guidance_scale, threshold,
    border_fraction, max_tries, templates); ``size``: the set's image size (default the normal images').
    Generation runs at the stack's resolution (the mask model's): normals are resized to it, results resized back."""
    names = [str(t) for t in type_names]
    if not len(names) == len(indices) == normal_images.shape[0]:
        raise ValueError(f"generate_pairs: {len(names)} types, {len(indices)} indices and {normal_images.shape[0]} "
                         "normal images: give one of each per sample")
    size = tuple(size or normal_images.shape[-2:])
    resolution = (stack.resolution, stack.resolution)
    latent_size = (stack.resolution // stack.latent_factor,) * 2
    streams = [sample_streams(seed, i) for i in indices]
    mask_ids = [mask_model.type_index(n) for n in names]
    embedding_ids = [embedding.type_index(n) for n in names]
    drawn = sample_masks(stack, mask_model, mask_ids, [s["mask"] for s in streams], latent_size=latent_size,
                         export_size=size, **dict(masks))
    blended = blended_generate(stack, embedding, resize(normal_images.float(), resolution), drawn.masks, embedding_ids,
                               [s["blend"] for s in streams], **dict(generation))
    images = resize(blended.images.float(), size).cpu()
    out_masks = latent_mask(blended.masks.cpu(), size)[:, 0]
    settings = {k: v for k, v in dict(generation).items() if k != "templates"}
    settings.update({f"mask_{k}": v for k, v in dict(masks).items() if k != "templates"})
    params = []
    for k, (index, name) in enumerate(zip(indices, names)):
        params.append({"defect_type": name, "type_id": embedding_ids[k], "seed": int(seed), "index": int(index),
                       "seeds": stream_seeds(seed, index), **settings, "mask_tries": drawn.tries[k],
                       "mask_template": drawn.templates[k], "template": blended.templates[k],
                       "generation_size": list(resolution)})
    return Pairs(images, out_masks, params)
