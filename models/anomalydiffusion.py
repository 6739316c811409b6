"""AnomalyDiffusion's stages (METHODS.md §4; the algorithm is :mod:`anomgen.generators.anomalydiffusion`,
:mod:`~anomgen.generators.anomalydiffusion_masks` and :mod:`~anomgen.generators.anomalydiffusion_pairs`):

- ``model=anomalydiffusion_embedding`` (:class:`AnomalyDiffusionEmbedding`, trains): the spatial anomaly embedding,
  e_a for every defect type of the category and the shared mask encoder, learned jointly with the masked diffusion
  loss (:func:`~anomgen.generators.anomalydiffusion.anomaly_loss`, Adam) on the first third of each type's anomalies.
  Writes ``<run>/embedding.safetensors``: the stage's ``embedding`` output.
- ``model=anomalydiffusion_masks`` (:class:`AnomalyDiffusionMasks`, trains): a mask embedding per defect type,
  plain textual inversion on the same anomalies' masks (:func:`~anomgen.generators.anomalydiffusion_masks.mask_loss`,
  AdamW). Writes ``<run>/masks.safetensors``: the ``masks`` output.
- ``model=anomalydiffusion`` (:class:`AnomalyDiffusionModel`, generates): ``num_per_type`` image–mask pairs per
  type, each a generated mask blended into a random normal training image
  (:func:`~anomgen.generators.anomalydiffusion_pairs.generate_pairs`), exported with their masks.

**Which data.** The training anomalies are the datamodule's ``anomaly_train`` (``datamodule.anomaly_train_fraction``:
1/3, the disjoint first-third split of :func:`anomgen.data.tasks.anomalydiffusion_split`), which the two trained
stages read as their training data (``datamodule.train_on=anomaly_train``). The split lives in the datamodule, not in
the stages, because the same datamodule config serves every stage of the experiment: the test split every stage and
``evaluate.py`` see then holds every good test image and only the *other* anomalies, so nothing is evaluated on what
the generator learned from. A defect type with too few anomalies for the split is an error naming it; training masks
that vanish on the latent grid or cover it are errors naming their files, before any step.

The frozen text-to-image stack is ``pretrained.anomaly_text_to_image`` (the LDM txt2img-f8 with LDM-BERT;
``debug=tiny``: a tiny random LDM), built in ``setup`` and kept out of the modules and checkpoints; what is trained
(the embedding, the mask vectors) is a submodule, so that DDP averages its gradient over the ranks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from torch import nn

from anomgen.data.generation import GeneratedBatch
from anomgen.distributed import rank_generator
from anomgen.errors import ConfigError, DatasetError
from anomgen.generators.anomalydiffusion import (
    NAME,
    AnomalyAugmentation,
    AnomalyDiffusionConfig,
)
from anomgen.generators.anomalydiffusion_masks import MaskGenerationConfig


def build_stack(text_to_image: Mapping, gradient_checkpointing: bool = False, frozen_dtype: str | None = None):
    """The frozen stack of a ``pretrained.anomaly_text_to_image`` entry, with the memory settings."""
    from anomgen.diffusion.text2image import build_text_to_image, configure_memory
    from anomgen.pretrained import plain_entry

    stack = build_text_to_image(**plain_entry(text_to_image))
    return configure_memory(stack, gradient_checkpointing, frozen_dtype)


def training_anomalies(module: LightningModule) -> tuple[object, list[str], str]:
    """(the datamodule's ``anomaly_train``, its defect types in order, its category) for a training stage; a clear
    error when the datamodule does not train on them."""
    datamodule = module.trainer.datamodule
    datamodule.setup("fit")
    anomalies = getattr(datamodule, "anomaly_train", None)
    stage = type(module).__name__
    if anomalies is None or getattr(datamodule, "train_on", None) != "anomaly_train":
        raise ConfigError(f"{stage} learns from real anomalies with masks: set datamodule.anomaly_train_fraction "
                          "(AnomalyDiffusion: 0.3333333333333333) and datamodule.train_on=anomaly_train")
    entries = anomalies.entries
    types = list(dict.fromkeys(str(e.defect_type) for e in entries))
    categories = sorted({str(e.category) for e in entries})
    if len(categories) != 1:
        raise ConfigError(f"{stage}: the training anomalies come from {len(categories)} categories {categories}; one "
                          "category per run (datamodule.dataset.category)")
    return anomalies, types, categories[0]


def check_training_masks(anomalies, resolution: int, latent_factor: int, where: str) -> None:
    """Every training mask, resized to the stack's resolution, keeps a cell of the latent grid and leaves one free:
    else an error naming the mask files."""
    from anomgen.diffusion.text2image import latent_mask
    from anomgen.generators.anomalydiffusion import check_masks

    masks, names = [], []
    for i in range(len(anomalies)):
        record = anomalies[i]
        masks.append(latent_mask(record["mask"][None].float(), (resolution, resolution)))
        names.append(record.get("mask_path") or record["image_path"])
    grid = (resolution // latent_factor, resolution // latent_factor)
    check_masks(torch.cat(masks), grid, where, names=names)


def _stack_info(text_to_image: Mapping) -> dict:
    from anomgen.pretrained import plain_entry

    entry = plain_entry(text_to_image)
    return {"source": entry.get("source"), "tiny": entry.get("tiny"), "resolution": entry.get("resolution")}


class _TrainsInStack(LightningModule):
    """What the two trained stages share: the stack built in ``setup``, moved in ``on_fit_start``, the per-rank
    training generator, and the product file written by rank 0 at the end."""

    trainable = True
    generates = False
    product = ""  # the output key, and the file's stem

    def __init__(self) -> None:
        super().__init__()
        self.stack = None
        self.stage_outputs: dict = {}
        self.type_names: list[str] = []
        self.category = ""
        self._type_index: dict[str, int] = {}

    def _setup_data(self, text_to_image: Mapping, gradient_checkpointing: bool, frozen_dtype: str | None):
        anomalies, self.type_names, self.category = training_anomalies(self)
        self._type_index = {t: i for i, t in enumerate(self.type_names)}
        self.stack = build_stack(text_to_image, gradient_checkpointing, frozen_dtype)
        check_training_masks(anomalies, self.stack.resolution, self.stack.latent_factor,
                             f"{type(self).__name__} (datamodule.anomaly_train)")

    def on_fit_start(self) -> None:
        """The stack is no submodule (its weights stay out of checkpoints): moved here."""
        self.stack.to(self.device)
        self._generator = rank_generator(self.hparams.seed, self.global_rank)  # seed + rank

    def type_ids(self, batch: dict) -> list[int]:
        try:
            return [self._type_index[str(t)] for t in batch["defect_type"]]
        except KeyError as err:
            raise DatasetError(f"training batch of defect type {err.args[0]!r}, not one of {self.type_names}") from None

    def _log_loss(self, loss: torch.Tensor, n: int) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{type(self).__name__}: loss is {loss.item()} at step {self.global_step}; lower "
                                     "model.lr")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)

    def _save_product(self, save, learned: nn.Module) -> None:
        """Rank 0 writes ``<run>/<product>.safetensors`` with ``save(path)``; every rank waits for it. Under DDP the
        ``learned`` parameters must first be equal on every rank (their gradients were averaged)."""
        from anomgen.distributed import check_ranks_agree

        check_ranks_agree(self, torch.cat([p.detach().flatten() for p in learned.parameters()]),
                          f"{self.product} parameters")
        if self.trainer.is_global_zero:
            path = save(Path(self.trainer.default_root_dir) / f"{self.product}.safetensors")
            self.stage_outputs = {self.product: str(Path(path).resolve())}
        self.trainer.strategy.barrier(f"anomalydiffusion_{self.product}_saved")


class AnomalyDiffusionEmbedding(_TrainsInStack):
    """The spatial anomaly embedding stage (see the module docstring). ``augmentation``: the
    :class:`~anomgen.generators.anomalydiffusion.AnomalyAugmentation` settings (null: none); an augmented mask that
    would vanish on or cover the latent grid keeps its sample unaugmented
    (:func:`~anomgen.generators.anomalydiffusion.augment_or_keep`)."""

    product = "embedding"

    def __init__(self, text_to_image: Mapping, num_type_tokens: int = 8, num_mask_tokens: int = 4,
                 init_word: str = "anomaly", lr: float = 5e-3, scale_lr: bool = False, mask_reduction: str = "mask",
                 templates: Sequence[str] | None = None, augmentation: Mapping | None = None,
                 encoder: Mapping | None = None, gradient_checkpointing: bool = False,
                 frozen_dtype: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = AnomalyDiffusionConfig(num_type_tokens=num_type_tokens, num_mask_tokens=num_mask_tokens,
                                             init_word=init_word, lr=lr, scale_lr=scale_lr,
                                             mask_reduction=mask_reduction,
                                             **({"templates": tuple(templates)} if templates else {}))
        self.augmentation = AnomalyAugmentation(**{
            k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
            for k, v in dict(augmentation).items()}) if augmentation else None
        self.embedding = None

    def setup(self, stage: str) -> None:
        if stage != "fit" or self.embedding is not None:
            return
        from anomgen.generators.anomalydiffusion import AnomalyEmbedding

        hp, config = self.hparams, self.config
        self._setup_data(hp.text_to_image, hp.gradient_checkpointing, hp.frozen_dtype)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            self.embedding = AnomalyEmbedding.from_stack(
                self.stack, len(self.type_names), config.num_type_tokens, config.num_mask_tokens, config.init_word,
                encoder=dict(hp.encoder) if hp.encoder else None, type_names=self.type_names)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        from anomgen.diffusion.text2image import latent_mask
        from anomgen.generators.anomalydiffusion import anomaly_loss, augment_or_keep
        from anomgen.pixels import resize

        stack, config = self.stack, self.config
        size = (stack.resolution, stack.resolution)
        images = resize(batch["image"].float(), size)
        masks = latent_mask(batch["mask"].float(), size)
        if self.augmentation is not None:
            grid = (stack.resolution // stack.latent_factor,) * 2
            images, masks, _ = augment_or_keep(self.augmentation, images.cpu(), masks.cpu(), grid, self._generator)
        loss = anomaly_loss(stack, self.embedding, images.to(self.device), masks.to(self.device), self.type_ids(batch),
                            self._generator, **config.loss_kwargs())
        self._log_loss(loss, len(images))
        return loss

    def configure_optimizers(self):
        from anomgen.generators.anomalydiffusion import anomaly_optimizer

        return anomaly_optimizer(self.embedding, self.config.lr, self.config.scale_lr,
                                 batch_size=self.trainer.datamodule.batch_size, num_devices=self.trainer.world_size)

    def on_fit_end(self) -> None:
        from anomgen.generators.anomalydiffusion import save_anomaly_embedding

        info = {"category": self.category, "stack": _stack_info(self.hparams.text_to_image),
                "init_word": self.config.init_word, "steps": int(self.global_step)}
        self._save_product(lambda path: save_anomaly_embedding(path, self.embedding, info), self.embedding)


class AnomalyDiffusionMasks(_TrainsInStack):
    """The mask-model stage (see the module docstring): ``num_vectors`` per type (code 16, paper 2-4), from
    ``init_word`` ("crack"), AdamW at ``lr`` (0.02)."""

    product = "masks"

    def __init__(self, text_to_image: Mapping, num_vectors: int = 16, init_word: str = "crack", lr: float = 0.02,
                 weight_decay: float = 1e-2, flip_p: float = 0.5, templates: Sequence[str] | None = None,
                 gradient_checkpointing: bool = False, frozen_dtype: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = MaskGenerationConfig(num_vectors=num_vectors, init_word=init_word, lr=lr,
                                           weight_decay=weight_decay, flip_p=flip_p,
                                           **({"templates": tuple(templates)} if templates else {}))
        self.mask_model = None

    def setup(self, stage: str) -> None:
        if stage != "fit" or self.mask_model is not None:
            return
        from anomgen.generators.anomalydiffusion_masks import MaskEmbedding

        hp = self.hparams
        self._setup_data(hp.text_to_image, hp.gradient_checkpointing, hp.frozen_dtype)
        self.mask_model = MaskEmbedding.from_stack(self.stack, self.type_names, self.config.num_vectors,
                                                   self.config.init_word)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        from anomgen.generators.anomalydiffusion_masks import mask_loss

        masks = batch["mask"].float()
        loss = mask_loss(self.stack, self.mask_model, masks, self.type_ids(batch), self._generator,
                         templates=self.config.templates, flip_p=self.config.flip_p)
        self._log_loss(loss, len(masks))
        return loss

    def configure_optimizers(self):
        from anomgen.generators.anomalydiffusion_masks import mask_optimizer

        return mask_optimizer(self.mask_model, self.config.lr, self.config.weight_decay)

    def on_fit_end(self) -> None:
        from anomgen.generators.anomalydiffusion_masks import save_mask_embedding

        info = {"category": self.category, "stack": _stack_info(self.hparams.text_to_image),
                "init_word": self.config.init_word, "steps": int(self.global_step)}
        self._save_product(lambda path: save_mask_embedding(path, self.mask_model, info), self.mask_model)


class AnomalyDiffusionModel(LightningModule):
    """The generation stage (see the module docstring): the files ``embedding`` and ``masks`` (the two trained
    stages' outputs) are read in ``setup``, so that the model is built from its config alone. Generation settings:
    :class:`~anomgen.generators.anomalydiffusion.AnomalyDiffusionConfig` (``steps``, ``eta``, ``guidance_scale``,
    ``aar``, ``final_blend``, ``dilation_factor``, ``templates``); the mask sampler's:
    :class:`~anomgen.generators.anomalydiffusion_masks.MaskGenerationConfig` (``mask_*``)."""

    trainable = False  # train.py skips Trainer.fit
    generates = True  # train.py runs Trainer.predict with the export callback

    def __init__(self, text_to_image: Mapping, embedding: str | None = None, masks: str | None = None,
                 num_per_type: int = 1000, steps: int = 200, eta: float = 1.0, guidance_scale: float = 1.0,
                 aar: str = "off", final_blend: bool = True, dilation_factor: int = 8,
                 templates: Sequence[str] | None = None, mask_steps: int = 100, mask_eta: float = 1.0,
                 mask_guidance_scale: float = 5.0, mask_threshold: float = 0.8, mask_border_fraction: float = 1 / 3,
                 mask_max_tries: int = 100, defect_types: Sequence[str] | None = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        extra = {"templates": tuple(templates)} if templates else {}
        if defect_types is not None and (isinstance(defect_types, str) or not len(defect_types)):
            raise ConfigError(f"model.defect_types must be null (every type of the files) or a non-empty list of "
                              f"defect types, got {defect_types!r}")
        self.config = AnomalyDiffusionConfig(steps=steps, eta=eta, guidance_scale=guidance_scale, aar=aar,
                                             final_blend=final_blend, dilation_factor=dilation_factor, **extra)
        self.mask_config = MaskGenerationConfig(steps=mask_steps, eta=mask_eta, guidance_scale=mask_guidance_scale,
                                                threshold=mask_threshold, border_fraction=mask_border_fraction,
                                                max_tries=mask_max_tries, **extra)
        if int(num_per_type) < 1:
            raise ConfigError(f"model.num_per_type must be >= 1, got {num_per_type}")
        self.generator_name = NAME
        self.stack = self.embedding = self.mask_model = None
        self.type_names: list[str] = []

    def _files(self) -> tuple[str, str]:
        hp = self.hparams
        missing = [k for k in ("embedding", "masks") if not hp.get(k)]
        if missing:
            raise ConfigError(f"model=anomalydiffusion needs model.{' and model.'.join(missing)}: the files of the "
                              "anomalydiffusion_embedding and anomalydiffusion_masks stages (${output:embedding."
                              "embedding}, ${output:masks.masks})")
        return str(hp.embedding), str(hp.masks)

    def read_types(self) -> list[str]:
        """The defect types to generate: every type of the embedding file (checked against the mask file's, read from
        their metadata), or the ``defect_types`` asked for, each of which the files must hold."""
        from anomgen.generators.anomalydiffusion import read_file_info

        embedding, masks = self._files()
        types, mask_types = read_file_info(embedding)["type_names"], read_file_info(masks)["type_names"]
        if sorted(types) != sorted(mask_types):
            raise ConfigError(f"the embedding file {embedding} has defect types {types}, the mask file {masks} has "
                              f"{mask_types}: they must be learned on the same category")
        asked = self.hparams.get("defect_types")
        if asked is None:
            return list(types)
        unknown = [t for t in asked if t not in types]
        if unknown:
            raise ConfigError(f"model.defect_types {unknown} are not in the embedding file {embedding} (its types: "
                              f"{types})")
        return [str(t) for t in asked]

    def predict_requests(self, support):
        """The requests over ``support`` (:class:`~anomgen.generators.anomalydiffusion_pairs.AnomalyDiffusionPlan`):
        ``num_per_type`` × types, the types cycled. Pure: reads only the files' metadata."""
        from anomgen.generators.anomalydiffusion_pairs import AnomalyDiffusionPlan

        return AnomalyDiffusionPlan(support, self.read_types(), self.hparams.num_per_type, self.hparams.seed)

    def setup(self, stage: str) -> None:
        if stage != "predict" or self.stack is not None:
            return
        from anomgen.generators.anomalydiffusion import load_anomaly_embedding
        from anomgen.generators.anomalydiffusion_masks import load_mask_embedding

        embedding_file, mask_file = self._files()
        self.type_names = self.read_types()
        self.stack = build_stack(self.hparams.text_to_image)
        width = self.stack.text_width
        embedding, mask_model = load_anomaly_embedding(embedding_file, width), load_mask_embedding(mask_file, width)
        datamodule = getattr(self.trainer, "datamodule", None)
        support = getattr(datamodule, "support", None)
        if support is not None and len(support):
            category = str(support[0]["category"])
            for path, made in ((embedding_file, embedding), (mask_file, mask_model)):
                learned = made.info.get("category")
                if learned is not None and learned != category:
                    raise ConfigError(f"{path} was learned on category {learned!r}; the datamodule's is {category!r}")
        self.embedding, self.mask_model = embedding.eval(), mask_model.eval()

    @property
    def set_info(self) -> dict:
        """What the export adds to ``set.json``."""
        hp = self.hparams
        return {"embedding": hp.embedding, "masks": hp.masks, "defect_types": self.type_names,
                "num_per_type": int(hp.num_per_type)}

    def on_predict_start(self) -> None:
        """The stack is no submodule (its weights stay out of checkpoints): moved here."""
        self.stack.to(self.device)

    def predict_step(self, batch: dict, batch_idx: int) -> GeneratedBatch:
        from anomgen.generators.anomalydiffusion_pairs import generate_pairs

        normal = batch["normal"]
        indices = batch["index"].tolist()
        names = [self.type_names[int(t)] for t in batch["type_id"]]
        pairs = generate_pairs(self.stack, self.embedding, self.mask_model, normal["image"], names, indices,
                               self.hparams.seed, generation=self.config.generation_kwargs(),
                               masks=self.mask_config.sampling_kwargs(),
                               size=tuple(normal["image"].shape[-2:]))
        return GeneratedBatch(
            index=batch["index"], image=pairs.images, mask=pairs.masks,
            label=torch.ones(len(indices), dtype=torch.long), generator=self.generator_name,
            category=[str(c) for c in normal["category"]], defect_type=names,
            sources=[[str(p)] for p in normal["image_path"]], params=pairs.params)
