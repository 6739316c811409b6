"""``model=adp_concept``: one of ADP's concept stages (METHODS.md §3; the formulas are :mod:`anomgen.detectors.adp`).

A stage learns one placeholder concept by textual inversion in the frozen text-to-image stack
(``pretrained.text_to_image``: SD 2.1, whose text encoder is open_clip ViT-H/14 less its last block) and scores it with
the full open_clip model (``pretrained.adp_clip``, the classifier g) through the shared token table:

- ``phase: normal`` learns c_n (Eq. 3) from the K normal shots: the textual-inversion loss (the UNet's ε or v error on
  the shots' latents, prompted with a template around the placeholder) − α · mean P_CLIP(S_n(c) | x_i), starting from
  the word ``initializer`` ("object").
- ``phase: anomaly`` learns c_a (Eq. 4), starting from the c_n file ``init_concept``: the same objective plus
  α · mean_j (P_CLIP(S_n(c) | x̃_j) − γ)⁺ over the pseudo-anomalies x̃ of the synthetic set ``pseudo_anomalies`` (an
  SDEdit stage's output).

Only the placeholder rows of the token table change (the rest is restored bit for bit after every step). At the end
rank 0 writes the concept in diffusers' textual-inversion format to ``<run dir>/concept.safetensors``: the stage's
``concept`` output (``pipe.load_textual_inversion`` reads it; so do ``model=sdedit``'s ``concept`` and
``detector=adp``). The UNet, the VAE and the CLIP stay out of the module's parameters and checkpoints: the trained
rows are the product, written as that file. The text encoder, whose table is trained, is a submodule, so that DDP
averages its gradient over the ranks. Steps: ``trainer.max_steps``.

α, γ, τ, the learning rate and the step count are in a supplement we do not have: the defaults (configs/model/
adp_concept.yaml) are diffusers' textual-inversion example (AdamW, lr 5e-4, weight decay 1e-2) and CLIP's own
temperature, marked *(check)*.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from lightning.pytorch import LightningModule

from anomgen.detectors import adp
from anomgen.distributed import rank_generator
from anomgen.errors import ConfigError

PHASES = ("normal", "anomaly")


class ADPConcept(LightningModule):
    trainable = True
    generates = False

    def __init__(self, text_to_image: Mapping, clip: Mapping, phase: str = "normal", placeholder: str = "<adp-n>",
                 num_vectors: int = 1, initializer: str = "object", init_concept: str | None = None,
                 pseudo_anomalies: str | None = None, alpha: float = 1.0, gamma: float = 0.5,
                 tau: float = adp.DEFAULT_TAU, templates: Sequence[str] | None = None, lr: float = 5e-4,
                 weight_decay: float = 1e-2, warmup_steps: int = 0, pseudo_batch_size: int = 8,
                 gradient_checkpointing: bool = False, frozen_dtype: str | None = None, seed: int = 0) -> None:
        super().__init__()
        if phase not in PHASES:
            raise ConfigError(f"model.phase must be one of {PHASES}, got {phase!r}")
        if phase == "anomaly" and not (init_concept and pseudo_anomalies):
            raise ConfigError("model.phase=anomaly (c_a) needs model.init_concept (the c_n concept file) and "
                              "model.pseudo_anomalies (a synthetic set of pseudo-anomalies)")
        if templates is not None and not templates:
            raise ConfigError("model.templates: give at least one prompt template with a {} for the concept")
        self.save_hyperparameters()
        self.templates = tuple(templates or adp.TEMPLATES)
        self.stage_outputs: dict = {}
        self.stack = self.classifier = self.concept = None
        self._support_index: dict[str, int] = {}

    # -- set-up -----------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or self.concept is not None:
            return
        from anomgen.diffusion.text2image import LatentCache, build_with_classifier, configure_memory
        from anomgen.diffusion.textual_inversion import TextualInversion
        from anomgen.encoders.clip import embed_images
        from anomgen.encoders.clip_text import load_concepts
        from anomgen.pixels import resize

        hp = self.hparams
        self.stack, self.classifier = build_with_classifier(hp.text_to_image, hp.clip)
        self.classifier.requires_grad_(False)
        configure_memory(self.stack, hp.gradient_checkpointing, hp.frozen_dtype)
        initializer = hp.initializer
        if hp.phase == "anomaly":
            width = self.stack.text_width
            concepts = load_concepts(hp.init_concept, width=width)
            if len(concepts) != 1:
                raise ConfigError(f"model.init_concept {hp.init_concept} holds {len(concepts)} concepts; expected one")
            initializer = next(iter(concepts.values()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            self.concept = TextualInversion(self.stack.tokenizer, self.stack.text_encoder, hp.placeholder,
                                            hp.num_vectors, initializer)
        self.concept.freeze_text_encoder()
        # the text encoder holds the trained token table: a submodule, so that DDP averages its gradient over the
        # ranks (one concept, not one per rank); the UNet, VAE and classifier stay out of the module and checkpoints
        self.text_encoder = self.stack.text_encoder

        datamodule = self.trainer.datamodule
        datamodule.setup("fit")
        support = [datamodule.support[i] for i in range(len(datamodule.support))]
        self._support_index = {r["image_path"]: i for i, r in enumerate(support)}
        images = torch.stack([r["image"] for r in support])
        size = (self.stack.resolution, self.stack.resolution)
        self.latents = LatentCache(self.stack, resize(images, size))
        with torch.no_grad():
            self.support_features = embed_images(self.classifier, images)
            self.pseudo_features = None
            if hp.phase == "anomaly":
                self.pseudo_features = adp.pseudo_anomaly_features(self.classifier, hp.pseudo_anomalies,
                                                                   images.shape[-2:], "model.pseudo_anomalies")

    def on_fit_start(self) -> None:
        """The UNet, VAE and classifier are no submodules (their weights stay out of checkpoints): moved here."""
        for module in (*self.stack.modules().values(), self.classifier):
            module.to(self.device)
        self.support_features = self.support_features.to(self.device)
        if self.pseudo_features is not None:
            self.pseudo_features = self.pseudo_features.to(self.device)
        self.concept.snapshot()
        self._generator = rank_generator(self.hparams.seed, self.global_rank, self.device)  # seed + rank

    # -- the objective ------------------------------------------------------------------------------------------
    def _state_embeddings(self) -> torch.Tensor:
        """G_s(c) (2 × D) of the current concept through the classifier's text tower (gradients to its rows)."""
        from anomgen.encoders.clip_text import encode_text_open_clip

        def encode(prompts: list[str]) -> torch.Tensor:
            ids = self.concept.input_ids(prompts)
            return encode_text_open_clip(self.classifier, ids, self.concept.token_embeddings(ids))

        return adp.averaged_state_embeddings(encode, self.hparams.placeholder, self.templates)

    def concept_terms(self, support_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The CLIP terms of Eq. 3 (and 4) on the shots ``support_index`` and a draw of pseudo-anomalies."""
        hp = self.hparams
        states = self._state_embeddings()
        terms = {"normal": adp.normal_concept_loss(
            adp.state_probabilities(self.support_features[support_index], states, hp.tau), hp.alpha)}
        if self.pseudo_features is not None:
            count = min(hp.pseudo_batch_size, len(self.pseudo_features))
            pick = torch.randperm(len(self.pseudo_features), generator=self._generator,
                                  device=self._generator.device)[:count].to(self.device)
            terms["anomaly"] = adp.anomaly_concept_loss(
                adp.state_probabilities(self.pseudo_features[pick], states, hp.tau), hp.alpha, hp.gamma)
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        from anomgen.diffusion.text2image import diffusion_loss

        hp = self.hparams
        try:
            index = torch.tensor([self._support_index[p] for p in batch["image_path"]], device=self.device)
        except KeyError as err:
            raise ValueError(f"training image {err.args[0]} is not in the support set the concept learns from "
                             "(the training loader must yield the support images unchanged)") from None
        templates = self.templates
        picks = torch.randint(len(templates), (len(index),), generator=self._generator, device=self._generator.device)
        prompts = [templates[int(j)].format(hp.placeholder) for j in picks]
        latents = self.latents.sample(index.cpu(), generator=None).to(self.device)
        inversion = diffusion_loss(self.stack, latents, self.concept.encode(prompts), generator=self._generator)
        terms = self.concept_terms(index)
        loss = inversion + sum(terms.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"ADP concept loss is {loss.item()} at step {self.global_step}; lower model.lr")
        n = len(index)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/inversion_loss", inversion, on_step=True, on_epoch=False, batch_size=n)
        for name, value in terms.items():
            self.log(f"train/clip_{name}_term", value, on_step=True, on_epoch=False, batch_size=n)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.concept.restore_frozen_rows()

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.concept.trainable_parameters(), lr=hp.lr, betas=(0.9, 0.999),
                                      weight_decay=hp.weight_decay)
        warmup = max(0, int(hp.warmup_steps))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- the product -------------------------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        from anomgen.distributed import check_ranks_agree

        check_ranks_agree(self, self.concept.learned_embeddings(), "concept vectors")  # the table's gradient averaged
        if self.trainer.is_global_zero:
            path = self.concept.save(Path(self.trainer.default_root_dir) / "concept.safetensors")
            self.stage_outputs = {"concept": str(path.resolve())}
        self.trainer.strategy.barrier("adp_concept_saved")
