"""The text-to-image stack shared by ADP and AnomalyDiffusion: load it, or build a tiny one, and train through it.

- :class:`TextToImageStack`: UNet, VAE, text encoder, tokenizer and noise scheduler, with the facts the training
  step needs (prediction type, VAE scaling factor, latent downsampling factor, ``kind`` "sd" | "ldm").
- :func:`load_text_to_image`: a diffusers folder (Stable Diffusion 1.5 / 2.1 / 2.1-base, or
  ``CompVis/ldm-text2im-large-256``) by hub id or local path, through :func:`anomgen.pretrained.resolve`.
- :func:`tiny_text_to_image`: the same architecture, tiny and random, in about a second (``pretrained=tiny``).
- :func:`sd21_architecture` / :func:`random_sd21_stack`: Stable Diffusion 2.1's architecture as data, and built
  with random weights at full size (or at a fraction of its widths), for speed and memory measurements.
- :func:`build_text_to_image`: one of the two from a config entry (``configs/pretrained/*.yaml: text_to_image``).
- The training step written out: :func:`encode_latents` ([0, 1] images → scaled latents), :func:`diffusion_loss`
  (noise, timestep, target ε / v / x₀, optional mask); :class:`LatentCache` encodes fixed images once per run.
- Memory: :func:`configure_memory` (gradient checkpointing, frozen parts in a lower precision) and
  :func:`autocast_context` (mixed precision).

Heavy imports (diffusers, transformers, open_clip) happen inside the functions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anomgen.encoders.clip_text import (
    CLIP_CONTEXT_LENGTH,
    TINY_OPEN_CLIP_CONFIG,
    TINY_OPEN_CLIP_NAME,
    clip_text_model_from_open_clip,
    clip_tokenizer,
    encode_with_embeddings,
    load_open_clip,
    tokenize,
)
from anomgen.errors import PretrainedNotFoundError
from anomgen.files import atomic_dir
from anomgen.pixels import from_diffusion_range, to_diffusion_range
from anomgen.pretrained import resolve

KINDS = ("sd", "ldm")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: the sub-folders of a diffusers folder, per kind: (vae, text encoder)
_FOLDERS = {"sd": ("vae", "text_encoder"), "ldm": ("vqvae", "bert")}
#: the components a stack reads from a diffusers folder (SD: vae, text_encoder; LDM: vqvae, bert)
_COMPONENTS = ("unet", "vae", "vqvae", "text_encoder", "bert", "tokenizer", "scheduler")
#: what a hub download of a diffusers repo fetches first: the components' configs, tokenizer files and non-variant
#: safetensors weights (not the single-file checkpoints at the top, fp16 / ema variants, or the safety checker)
HUB_PATTERNS = ["model_index.json"] + [f"{c}/{name}" for c in _COMPONENTS for name in (
    "*.json", "*.txt", "diffusion_pytorch_model.safetensors", "model.safetensors")]
#: fetched only for a component that has no safetensors weights
HUB_BIN_PATTERNS = ["diffusion_pytorch_model.bin", "pytorch_model.bin"]
#: Stable Diffusion's (and LDM txt2img's) training schedule
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "clip_sample": False, "steps_offset": 1}


@dataclass(eq=False)
class TextToImageStack:
    """A latent text-to-image diffusion model as parts. Images are [0, 1] RGB, latents are ``scaling_factor`` × the
    VAE's latents (what the UNet sees), ``latent_factor`` times smaller than the images.

    ``noise_scheduler`` is a ``DDPMScheduler`` of the model's training schedule (``add_noise``, ``get_velocity``);
    :meth:`sampling_scheduler` makes a sampler (DDIM, ...) of the same schedule. ``open_clip_model`` is the open_clip
    model the text encoder was converted from when the stack was built from one (tiny stacks: ADP's classifier
    shares its token table); ``None`` for loaded stacks (load the classifier with
    :func:`anomgen.encoders.clip_text.load_open_clip`)."""

    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    noise_scheduler: Any
    prediction_type: str
    scaling_factor: float
    latent_factor: int
    kind: str
    source: str | None = None
    open_clip_model: nn.Module | None = field(default=None, repr=False)

    @property
    def resolution(self) -> int:
        """The image size the UNet was built for (``sample_size`` × ``latent_factor``: 768 for SD 2.1)."""
        return int(self.unet.config.sample_size) * self.latent_factor

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def text_width(self) -> int:
        """The width of the text encoder's token embeddings (1024 for SD 2.x, 1280 for LDM-BERT)."""
        return int(self.text_encoder.get_input_embeddings().embedding_dim)

    def modules(self) -> dict[str, nn.Module]:
        """The stack's modules by name (unet, vae, text_encoder, and open_clip_model when present)."""
        found = {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}
        if self.open_clip_model is not None:
            found["open_clip_model"] = self.open_clip_model
        return found

    def to(self, device: torch.device | str) -> TextToImageStack:
        """Move every module to ``device`` (in place); returns the stack."""
        for module in self.modules().values():
            module.to(device)
        return self

    def freeze(self) -> TextToImageStack:
        """Every module in eval mode with ``requires_grad=False`` (what is trained is turned back on by its user,
        e.g. :meth:`anomgen.diffusion.textual_inversion.TextualInversion.freeze_text_encoder`)."""
        for module in self.modules().values():
            module.eval().requires_grad_(False)
        return self

    def tokenize(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Token ids (B × 77) on the stack's device; a prompt that does not fit is an error (nothing is cut)."""
        return tokenize(self.tokenizer, prompts if isinstance(prompts, str) else list(prompts)).to(self.device)

    def encode_prompts(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """The text encoder's hidden states (B × 77 × d) of ``prompts``: the UNet's ``encoder_hidden_states``."""
        return encode_with_embeddings(self.text_encoder, self.tokenize(prompts))

    def sampling_scheduler(self, name: str = "DDIMScheduler", **overrides):
        """A new diffusers scheduler ``name`` (``"DDIMScheduler"``, ``"DDPMScheduler"``, ...) of the stack's training
        schedule and prediction type; ``overrides`` change its config (e.g. ``timestep_spacing``)."""
        import diffusers

        cls = getattr(diffusers, name, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ValueError(f"sampling_scheduler: diffusers has no scheduler {name!r}")
        return cls.from_config({**self.noise_scheduler.config, **overrides})


# ------------------------------------------------------------------------------------------------------ loading


def _check_prediction_type(declared: str | None, found: str, source: str) -> str:
    if found not in PREDICTION_TYPES:
        raise ValueError(f"{source}: scheduler prediction_type {found!r} is not one of {PREDICTION_TYPES}")
    if declared is not None and declared != found:
        raise ValueError(f"{source}: the setting says prediction_type={declared!r} but the model's scheduler config "
                         f"says {found!r} (SD 2.1 is the 768 px v_prediction model, 2.1-base the 512 px epsilon one): "
                         f"fix the setting, or give the other model")
    return found


def _strict(loaded, source: str):
    """``from_pretrained(..., output_loading_info=True)``'s model, refusing missing, unexpected or mismatched keys."""
    model, info = loaded
    problems = {kind: [k for k in info.get(kind, []) if not str(k).endswith("position_ids")]
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        shown = "; ".join(f"{kind}: {', '.join(map(str, keys[:8]))}" + (f" ... ({len(keys)})" if len(keys) > 8 else "")
                          for kind, keys in problems.items())
        raise RuntimeError(f"weights of {source} do not fit {type(model).__name__}: {shown}")
    return model


def _weights_present(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("diffusion_pytorch_model.safetensors", "model.safetensors",
                                                      "diffusion_pytorch_model.bin", "pytorch_model.bin"))


def load_text_to_image(source: str | os.PathLike, prediction_type: str | None = None,
                       torch_dtype: torch.dtype | None = None) -> TextToImageStack:
    """Load a text-to-image diffusers folder: ``source`` is a hub id (``stabilityai/stable-diffusion-2-1`` or a
    mirror, ``sd-legacy/stable-diffusion-v1-5``, ``CompVis/ldm-text2im-large-256``) or a local folder saved by a
    diffusers pipeline's ``save_pretrained``. It is found by :func:`anomgen.pretrained.resolve`: offline and missing
    is a :class:`~anomgen.errors.PretrainedNotFoundError` at once, naming the id and how to supply it.

    Stable Diffusion folders hold ``unet, vae, text_encoder (CLIPTextModel), tokenizer (CLIPTokenizer), scheduler``;
    LDM folders hold ``unet, vqvae (AutoencoderKL), bert (LDMBertModel), tokenizer (BertTokenizer), scheduler``.
    Weights load strictly. ``prediction_type`` and the VAE scaling factor are read from the scheduler and VAE
    configs; a stated ``prediction_type`` that differs from the scheduler's is an error naming both. The modules are
    returned frozen (eval mode, ``requires_grad=False``), on the CPU, in ``torch_dtype`` when given."""
    source = str(source)
    folder = resolve(source, allow_patterns=HUB_PATTERNS)  # first: a missing model fails before the heavy imports
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    kind = "ldm" if (folder / "bert").is_dir() else "sd"
    vae_dir, text_dir = _FOLDERS[kind]
    for sub in ("unet", vae_dir, text_dir, "tokenizer", "scheduler"):
        if not (folder / sub).is_dir():
            raise PretrainedNotFoundError(f"{source} ({folder}) is no text-to-image diffusers folder: it has no {sub}/ "
                                          f"(expected unet/, {vae_dir}/, {text_dir}/, tokenizer/, scheduler/)")
    without = [sub for sub in ("unet", vae_dir, text_dir) if not _weights_present(folder / sub)]
    if without and not Path(source).expanduser().exists():  # a hub repo of .bin weights only
        folder = resolve(source, allow_patterns=[f"{sub}/{name}" for sub in without for name in HUB_BIN_PATTERNS])
    for sub in without:
        if not _weights_present(folder / sub):
            raise PretrainedNotFoundError(f"{source}: {folder / sub} holds no weights file")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    found = _check_prediction_type(prediction_type, scheduler.config.prediction_type, source)
    unet = _strict(UNet2DConditionModel.from_pretrained(folder, subfolder="unet", output_loading_info=True),
                   f"{source}/unet")
    vae = _strict(AutoencoderKL.from_pretrained(folder, subfolder=vae_dir, output_loading_info=True),
                  f"{source}/{vae_dir}")
    if kind == "sd":
        from transformers import CLIPTextModel, CLIPTokenizer

        text_encoder = _strict(CLIPTextModel.from_pretrained(folder / text_dir, output_loading_info=True),
                               f"{source}/{text_dir}")
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    else:
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
        from transformers import BertTokenizer

        text_encoder = _strict(LDMBertModel.from_pretrained(folder / text_dir, output_loading_info=True),
                               f"{source}/{text_dir}")
        tokenizer = BertTokenizer.from_pretrained(folder / "tokenizer")
    context = int(text_encoder.config.max_position_embeddings)
    if kind == "ldm" or tokenizer.model_max_length > context:  # LDM's pipeline pads BERT ids to 77 whatever its config
        tokenizer.model_max_length = context
    stack = TextToImageStack(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, noise_scheduler=scheduler,
        prediction_type=found, scaling_factor=float(vae.config.scaling_factor),
        latent_factor=2 ** (len(vae.config.block_out_channels) - 1), kind=kind, source=source)
    if torch_dtype is not None:
        for module in stack.modules().values():
            module.to(torch_dtype)
    return stack.freeze()


# ---------------------------------------------------------------------------------------------------- tiny stacks


#: the vocabulary of the tiny LDM's BERT tokenizer: specials, single characters and their word pieces, a few words
def _tiny_bert_vocab() -> list[str]:
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    words = ["a", "photo", "of", "the", "with", "damage", "damaged", "flawless", "object", "anomaly", "crack", "an"]
    punct = list(".,!?'\"-()*<>_:;/")
    return (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(chars + words)) + punct
            + [f"##{c}" for c in chars])


def tiny_bert_tokenizer(cache_dir: str | os.PathLike | None = None):
    """A ``BertTokenizer`` (lower case, 77 tokens) of a small vocabulary that spells any lower-case ASCII text
    (characters and ``##`` pieces plus a few whole words): the tiny stand-in for LDM's bert-base-uncased tokenizer."""
    import hashlib
    import tempfile

    from transformers import BertTokenizer

    vocab = "\n".join(_tiny_bert_vocab()) + "\n"
    root = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
    folder = root / f"anomgen-tiny-bert-{hashlib.sha256(vocab.encode()).hexdigest()[:12]}"
    if not (folder / "vocab.txt").is_file():
        with atomic_dir(folder, exist_ok=True) as tmp:
            (tmp / "vocab.txt").write_text(vocab)
    return BertTokenizer.from_pretrained(str(folder), do_lower_case=True, model_max_length=77)


def tiny_text_to_image(kind: str = "sd", resolution: int = 32, prediction_type: str = "epsilon",
                       open_clip_model: nn.Module | None = None, seed: int = 0, text_width: int = 32,
                       block_out_channels: Sequence[int] = (16, 32),
                       vae_block_out_channels: Sequence[int] = (16, 32)) -> TextToImageStack:
    """A tiny random text-to-image stack of the real architecture (about 1 s to build), frozen, on the CPU.

    ``kind="sd"``: UNet2DConditionModel (linear projections as in SD 2.x), AutoencoderKL, and a ``CLIPTextModel``
    converted from the open_clip model ``open_clip_model`` (default: a new random
    :data:`~anomgen.encoders.clip_text.TINY_OPEN_CLIP_CONFIG` model, kept as ``stack.open_clip_model``), so that the
    text encoder and the open_clip classifier share the token table; the tokenizer is
    :func:`~anomgen.encoders.clip_text.clip_tokenizer`. ``kind="ldm"``: an ``LDMBertModel`` of width ``text_width``
    and :func:`tiny_bert_tokenizer` instead. The noise scheduler is SD's ``scaled_linear`` DDPM schedule with
    ``prediction_type``. The latent factor is ``2 ** (len(vae_block_out_channels) - 1)``. Seeded by ``seed``; the
    global random state is left as it was."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if kind not in KINDS:
        raise ValueError(f"tiny_text_to_image: kind must be one of {KINDS}, got {kind!r}")
    _check_prediction_type(None, prediction_type, "tiny_text_to_image")
    latent_factor = 2 ** (len(vae_block_out_channels) - 1)
    if resolution % latent_factor or resolution // latent_factor < 2 ** (len(block_out_channels) - 1):
        raise ValueError(f"tiny_text_to_image: resolution {resolution} must be a multiple of the latent factor "
                         f"{latent_factor} and leave room for {len(block_out_channels)} UNet levels")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "sd":
            if open_clip_model is None:
                open_clip_model = load_open_clip(TINY_OPEN_CLIP_NAME, None, TINY_OPEN_CLIP_CONFIG)
            text_encoder = clip_text_model_from_open_clip(open_clip_model)
            tokenizer = clip_tokenizer(text_encoder.config.max_position_embeddings)
        else:
            from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

            tokenizer = tiny_bert_tokenizer()
            text_encoder = LDMBertModel(LDMBertConfig(
                vocab_size=len(tokenizer), d_model=text_width, encoder_layers=2, encoder_attention_heads=2,
                head_dim=text_width // 2, encoder_ffn_dim=2 * text_width, max_position_embeddings=77))
        width = text_encoder.get_input_embeddings().embedding_dim
        levels = len(block_out_channels)
        unet = UNet2DConditionModel(
            sample_size=resolution // latent_factor, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=tuple(block_out_channels),
            down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
            cross_attention_dim=width, attention_head_dim=2, norm_num_groups=8,
            use_linear_projection=kind == "sd")
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
            block_out_channels=tuple(vae_block_out_channels),
            down_block_types=("DownEncoderBlock2D",) * len(vae_block_out_channels),
            up_block_types=("UpDecoderBlock2D",) * len(vae_block_out_channels),
            sample_size=resolution, scaling_factor=0.18215)
    scheduler = DDPMScheduler(**SD_SCHEDULE, prediction_type=prediction_type)
    stack = TextToImageStack(
        unet=unet, vae=vae, text_encoder=text_encoder.eval(), tokenizer=tokenizer, noise_scheduler=scheduler,
        prediction_type=prediction_type, scaling_factor=float(vae.config.scaling_factor), latent_factor=latent_factor,
        kind=kind, source=None, open_clip_model=open_clip_model if kind == "sd" else None)
    return stack.freeze()


#: the open_clip model whose text tower, less its last block, is Stable Diffusion 2.x's text encoder (ADP's classifier)
SD21_OPEN_CLIP_NAME = "ViT-H-14"


def sd21_architecture(scale: float = 1.0, resolution: int = 768) -> dict[str, Any]:
    """Stable Diffusion 2.1's architecture (the 768 px v-prediction model) as data, to build with random weights:
    ``{"unet": UNet2DConditionModel kwargs, "vae": AutoencoderKL kwargs, "open_clip": (model name, config),
    "prediction_type": "v_prediction", "scale", "resolution"}``. At ``scale=1`` these are the settings of SD 2.1's
    ``unet/config.json`` and ``vae/config.json`` (865.9 M and 83.7 M parameters) and open_clip's ViT-H-14 (whose text
    tower less its last block is the 340 M-parameter text encoder).

    ``scale`` (a multiple of 1/16 in (0, 1]) multiplies every channel width (UNet, VAE, text and image towers) and
    keeps the rest: depths, head counts, channels per norm group (the group count scales), vocabulary, context
    length. It is the same graph at a smaller size, for CPU smoke runs. ``resolution`` (pixels, a multiple of 64: the
    VAE's factor 8 times the UNet's three down-samplings) sets ``sample_size``. The open_clip config is ``None`` at
    ``scale=1`` (open_clip's own ``ViT-H-14``); otherwise it is to be registered under the returned name
    (:func:`~anomgen.encoders.clip_text.register_open_clip_config`)."""
    scale = float(scale)
    if not 0 < scale <= 1 or abs(scale * 16 - round(scale * 16)) > 1e-9:
        raise ValueError(f"sd21_architecture: scale must be a multiple of 1/16 in (0, 1], got {scale}")
    if resolution < 64 or resolution % 64:
        raise ValueError(f"sd21_architecture: resolution must be a positive multiple of 64 (latent factor 8 and "
                         f"three UNet down-samplings), got {resolution}")

    def w(channels: int) -> int:
        return int(round(channels * scale))

    groups = w(32)
    unet = dict(
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=tuple(w(c) for c in (320, 640, 1280, 1280)),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20),  # diffusers' name for the number of heads in SD 2.x: 64 channels each
        cross_attention_dim=w(1024), use_linear_projection=True, upcast_attention=True, norm_num_groups=groups,
        norm_eps=1e-5, act_fn="silu", flip_sin_to_cos=True, freq_shift=0)
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=groups, act_fn="silu",
        block_out_channels=tuple(w(c) for c in (128, 256, 512, 512)),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=resolution, scaling_factor=0.18215)
    if scale == 1:
        clip_name, clip_config = SD21_OPEN_CLIP_NAME, None
    else:
        clip_name = f"anomgen-sd21-text-clip-{round(scale * 16)}of16"
        clip_config = {
            "embed_dim": w(1024),
            "vision_cfg": {"image_size": 224, "layers": 32, "width": w(1280), "head_width": w(80), "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": w(1024), "heads": 16, "layers": 24}}
    return {"unet": unet, "vae": vae, "open_clip": (clip_name, clip_config), "prediction_type": "v_prediction",
            "scale": scale, "resolution": int(resolution)}


def random_sd21_stack(scale: float = 1.0, resolution: int = 768, device: torch.device | str = "cpu",
                      seed: int = 0) -> TextToImageStack:
    """Stable Diffusion 2.1 (:func:`sd21_architecture` at ``scale`` and ``resolution``) with random weights, built
    offline on ``device`` (parameters are created and initialised there, not copied from the CPU; the full size
    takes one to two minutes on 2 CPU cores; ``device="meta"`` builds the shapes only), frozen, float32,
    v-prediction. The text encoder is converted from a random open_clip ViT-H-14
    (:func:`~anomgen.encoders.clip_text.clip_text_model_from_open_clip`), which is kept as ``stack.open_clip_model``:
    ADP's classifier, sharing the token table's values. For speed and memory measurements (the outputs are noise).
    Seeded by ``seed``; the global random state is left as it was."""
    import open_clip
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from anomgen.encoders.clip_text import register_open_clip_config

    arch = sd21_architecture(scale, resolution)
    device = torch.device(device)
    clip_name, clip_config = arch["open_clip"]
    if clip_config is not None:
        register_open_clip_config(clip_name, clip_config)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.device(device):
        torch.manual_seed(seed)
        classifier = open_clip.create_model(clip_name, pretrained=None, device=device).eval()
        text_encoder = clip_text_model_from_open_clip(classifier).to(device)
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
    stack = TextToImageStack(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(CLIP_CONTEXT_LENGTH),
        noise_scheduler=DDPMScheduler(**SD_SCHEDULE, prediction_type=arch["prediction_type"]),
        prediction_type=arch["prediction_type"], scaling_factor=float(vae.config.scaling_factor), latent_factor=8,
        kind="sd", source=None, open_clip_model=classifier)
    return stack.to(device).freeze()


def build_text_to_image(source: str | os.PathLike | None = None, prediction_type: str | None = None,
                        resolution: int | None = None, tiny: dict | None = None,
                        open_clip_model: nn.Module | None = None,
                        torch_dtype: torch.dtype | None = None) -> TextToImageStack:
    """The stack of a ``text_to_image`` config entry (``configs/pretrained/{paper,tiny}.yaml``:
    ``build_text_to_image(**cfg.pretrained.text_to_image, open_clip_model=clip)``).

    With ``source``: :func:`load_text_to_image` (``source``, ``prediction_type`` checked against the scheduler;
    ``resolution`` is the run's image size and is not checked against the model's native ``stack.resolution``;
    ``open_clip_model`` is ignored: load the classifier separately, SD 2.x's text encoder is that of open_clip
    ViT-H-14 / laion2b_s32b_b79k). Without: :func:`tiny_text_to_image` with ``**tiny``, ``resolution`` (default 32),
    ``prediction_type`` (default ε) and ``open_clip_model`` (its token table shared with the text encoder)."""
    if source is not None:
        return load_text_to_image(source, prediction_type=prediction_type, torch_dtype=torch_dtype)
    kwargs = dict(tiny or {})
    for key, value in (("prediction_type", prediction_type), ("resolution", resolution)):
        if value is not None and kwargs.setdefault(key, value) != value:
            raise ValueError(f"build_text_to_image: {key}={value!r} and tiny.{key}={kwargs[key]!r} differ")
    stack = tiny_text_to_image(open_clip_model=open_clip_model, **kwargs)
    if torch_dtype is not None:
        for module in stack.modules().values():
            module.to(torch_dtype)
    return stack


def build_with_classifier(text_to_image: Mapping, clip: Mapping | None = None,
                          need_classifier: bool = True) -> tuple[TextToImageStack, nn.Module | None]:
    """(stack, open_clip model) of a ``pretrained.text_to_image`` entry and a ``pretrained.adp_clip`` entry (plain
    dicts or DictConfigs). A tiny stack (``source: null``) converts its text encoder from that open_clip model, so that
    the two share the token table as SD 2.x and ViT-H/14 do (a tiny stack without ``clip`` makes its own tiny one). The
    open_clip model is returned when ``need_classifier`` (ADP's classifier g), else ``None``."""
    from anomgen.encoders.clip_text import load_open_clip
    from anomgen.pretrained import plain_entry

    entry, clip = plain_entry(text_to_image), plain_entry(clip)
    tiny = entry.get("source") is None
    if need_classifier and not clip:
        raise ValueError("ADP's classifier needs an open_clip entry (pretrained.adp_clip), got none")
    classifier = load_open_clip(**clip) if clip and (tiny or need_classifier) else None
    stack = build_text_to_image(**entry, open_clip_model=classifier if tiny else None)
    return stack, classifier if need_classifier else None


def to_pipeline(stack: TextToImageStack, scheduler=None):
    """A diffusers pipeline of the stack's modules (shared, not copied): ``StableDiffusionPipeline`` (no safety
    checker) or ``LDMTextToImagePipeline``, with ``scheduler`` (default: a DDIM sampler of the schedule). For
    reference checks and for :func:`save_text_to_image`; the project's own loops are written out."""
    scheduler = scheduler if scheduler is not None else stack.sampling_scheduler("DDIMScheduler")
    if stack.kind == "sd":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(vae=stack.vae, text_encoder=stack.text_encoder, tokenizer=stack.tokenizer,
                                       unet=stack.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    from diffusers import LDMTextToImagePipeline

    return LDMTextToImagePipeline(vqvae=stack.vae, bert=stack.text_encoder, tokenizer=stack.tokenizer,
                                  unet=stack.unet, scheduler=scheduler)


def save_text_to_image(stack: TextToImageStack, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save the stack as a diffusers folder (atomically) that :func:`load_text_to_image` and diffusers' pipelines
    read; its scheduler is the stack's noise scheduler (its config carries the prediction type)."""
    folder = Path(folder)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        to_pipeline(stack, scheduler=stack.noise_scheduler).save_pretrained(tmp)
    return folder


def read_model_index(folder: str | os.PathLike) -> dict:
    """The ``model_index.json`` of a diffusers folder (which pipeline and components it holds)."""
    return json.loads((Path(folder) / "model_index.json").read_text())


# --------------------------------------------------------------------------------------------------- training step


def encode_latents(stack: TextToImageStack, images: torch.Tensor, generator: torch.Generator | None = None,
                   sample: bool = True) -> torch.Tensor:
    """Scaled latents (B × C × H/f × W/f) of [0, 1] images (B × 3 × H × W, H and W multiples of the latent factor
    f): a draw from the VAE posterior (``sample=True``, as diffusers' training scripts do; ``generator`` seeds it) or
    its mean, times ``scaling_factor``. Gradients flow when enabled (the VAE is usually frozen: wrap in no_grad)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"encode_latents: images must be B × 3 × H × W in [0, 1], got shape {tuple(images.shape)}")
    if images.shape[-1] % stack.latent_factor or images.shape[-2] % stack.latent_factor:
        raise ValueError(f"encode_latents: image size {tuple(images.shape[-2:])} is not a multiple of the latent "
                         f"factor {stack.latent_factor}")
    vae = stack.vae
    dist = vae.encode(to_diffusion_range(images).to(device=vae.device, dtype=vae.dtype)).latent_dist
    latents = dist.sample(generator=generator) if sample else dist.mode()
    return latents * stack.scaling_factor


def decode_latents(stack: TextToImageStack, latents: torch.Tensor) -> torch.Tensor:
    """[0, 1] images (B × 3 × H × W, float32) of scaled latents: the inverse of :func:`encode_latents`."""
    vae = stack.vae
    images = vae.decode((latents / stack.scaling_factor).to(device=vae.device, dtype=vae.dtype)).sample
    return from_diffusion_range(images.float()).clamp(0, 1)


class LatentCache:
    """The VAE posterior of a fixed set of [0, 1] images (N × 3 × H × W), computed once, on first use: when no
    augmentation changes the images, a run encodes them once instead of at every step.

    :meth:`sample` draws latents from the cached posterior (mean + std · noise, times the scaling factor): equal in
    distribution to :func:`encode_latents` of the same images at every step, and equal draw for draw to it with the
    same ``generator``. :meth:`mean` gives the posterior means."""

    def __init__(self, stack: TextToImageStack, images: torch.Tensor, batch_size: int = 16) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"LatentCache: images must be N × 3 × H × W in [0, 1], got shape {tuple(images.shape)}")
        self.stack = stack
        self.images = images
        self.batch_size = int(batch_size)
        self._mean: torch.Tensor | None = None
        self._std: torch.Tensor | None = None
        #: how many times the images were encoded (1 after first use)
        self.encodings = 0

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _encode(self) -> None:
        means, stds = [], []
        vae = self.stack.vae
        with torch.no_grad():
            for start in range(0, len(self), self.batch_size):
                chunk = self.images[start:start + self.batch_size]
                dist = vae.encode(to_diffusion_range(chunk).to(device=vae.device, dtype=vae.dtype)).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
        self._mean, self._std = torch.cat(means), torch.cat(stds)
        self.encodings += 1

    def _select(self, index) -> tuple[torch.Tensor, torch.Tensor]:
        if self._mean is None:
            self._encode()
        if index is None:
            return self._mean, self._std
        return self._mean[index], self._std[index]

    def mean(self, index: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """The scaled posterior means of the images ``index`` (all by default)."""
        mean, _ = self._select(index)
        return mean * self.stack.scaling_factor

    def sample(self, index: torch.Tensor | Sequence[int] | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents drawn from the cached posterior of the images ``index`` (all by default)."""
        mean, std = self._select(index)
        device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        return (mean + std * noise) * self.stack.scaling_factor


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (B × H × W or B × 1 × H × W, values in [0, 1]) on the latent grid ``size``: resized bilinearly
    (antialiased) and thresholded at 0.5, as AnomalyDiffusion's code does; B × 1 × h × w float of {0, 1}."""
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be B × H × W or B × 1 × H × W, got shape {tuple(mask.shape)}")
    resized = F.interpolate(mask.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return (resized >= 0.5).float()


def diffusion_target(stack: TextToImageStack, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: ε (``epsilon``), the velocity ``scheduler.get_velocity`` =
    √ᾱ_t ε − √(1−ᾱ_t) x₀ (``v_prediction``), or x₀ (``sample``)."""
    if stack.prediction_type == "epsilon":
        return noise
    if stack.prediction_type == "v_prediction":
        return stack.noise_scheduler.get_velocity(latents, noise, timesteps)
    if stack.prediction_type == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {stack.prediction_type!r}; expected one of {PREDICTION_TYPES}")


def diffusion_loss(stack: TextToImageStack, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                   mask_reduction: str = "mask") -> torch.Tensor:
    """The denoising loss of one training step, written out (as diffusers' textual-inversion script does it).

    1. ``noise`` ~ N(0, I) like ``latents`` and ``timesteps`` ~ U{0, …, T−1} per sample, unless given; drawn in that
       order from ``generator`` (default: the global generator of the latents' device).
    2. x_t = ``noise_scheduler.add_noise(latents, noise, timesteps)``; the UNet predicts from
       (x_t, t, ``encoder_hidden_states``), run in the UNet's dtype.
    3. The target is :func:`diffusion_target` (ε, v or x₀ by ``stack.prediction_type``); the squared error is taken
       per latent pixel, in float32.
    4. Without ``mask``: its mean. With ``mask`` (B × H × W or B × 1 × H × W in pixels, any size): the mask on the
       latent grid (:func:`latent_mask`), then ``mask_reduction="mask"``: the mean over the masked area,
       Σ m·err / (C · Σ m); ``"latent"``: Σ m·err / (B·C·h·w), the mean over the whole latent as AnomalyDiffusion's
       code does. A sample whose mask vanishes on the latent grid is an error naming it.
    """
    if latents.dim() != 4:
        raise ValueError(f"diffusion_loss: latents must be B × C × h × w, got shape {tuple(latents.shape)}")
    batch = latents.shape[0]
    if encoder_hidden_states.shape[0] != batch:
        raise ValueError(f"diffusion_loss: {encoder_hidden_states.shape[0]} encoder_hidden_states for {batch} latents")
    scheduler = stack.noise_scheduler
    draw_device = generator.device if generator is not None else latents.device
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=draw_device, dtype=latents.dtype)
    noise = noise.to(latents.device)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator,
                                  device=draw_device)
    timesteps = timesteps.to(latents.device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    unet = stack.unet
    prediction = unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states.to(unet.dtype)).sample
    target = diffusion_target(stack, latents, noise, timesteps)
    error = (prediction.float() - target.float()).square()
    if mask is None:
        return error.mean()
    if mask_reduction not in ("mask", "latent"):
        raise ValueError(f"diffusion_loss: mask_reduction must be 'mask' or 'latent', got {mask_reduction!r}")
    if mask.shape[0] != batch:
        raise ValueError(f"diffusion_loss: {mask.shape[0]} masks for {batch} latents")
    m = latent_mask(mask.to(latents.device), tuple(latents.shape[-2:]))
    empty = (m.flatten(1).sum(dim=1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"diffusion_loss: the masks of samples {empty} vanish on the {tuple(latents.shape[-2:])} "
                         "latent grid (too small after resizing): reject them before the step")
    weighted = (error * m).sum()
    if mask_reduction == "latent":
        return weighted / error.numel()
    return weighted / (m.sum() * error.shape[1])


# ------------------------------------------------------------------------------------------------------- memory


_PRECISIONS = {None: None, "32": None, "fp32": None, "float32": None, "32-true": None,
               "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "bf16-mixed": torch.bfloat16,
               "16": torch.float16, "fp16": torch.float16, "float16": torch.float16, "16-mixed": torch.float16}


def precision_dtype(precision: str | torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype of a precision setting (``"bf16"``, ``"fp16"``, ``"16-mixed"``, ...), None for full."""
    if isinstance(precision, torch.dtype):
        return None if precision == torch.float32 else precision
    key = None if precision is None else str(precision)
    if key not in _PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(k for k in _PRECISIONS if k)}")
    return _PRECISIONS[key]


def autocast_context(device: torch.device | str, precision: str | torch.dtype | None):
    """Mixed precision for a forward pass: ``torch.autocast`` on ``device``'s type with the dtype of ``precision``
    (:func:`precision_dtype`), or a no-op for full precision. (Under Lightning, the Trainer's ``precision`` does
    this already.)"""
    dtype = precision_dtype(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def configure_memory(stack: TextToImageStack, gradient_checkpointing: bool = False,
                     frozen_dtype: str | torch.dtype | None = None) -> TextToImageStack:
    """Memory settings of a run that trains token embeddings through a frozen stack:

    - ``gradient_checkpointing``: the UNet (``unet.enable_gradient_checkpointing()``) and the text encoder
      (transformers' ``activation_checkpointing_enable``; it checkpoints only in train mode) recompute activations in
      the backward pass instead of storing them; results are unchanged.
    - ``frozen_dtype`` (``"fp16"``, ``"bf16"``, a dtype): the UNet and the VAE, which are frozen, are cast to it, as
      diffusers' scripts do with ``weight_dtype``; the text encoder, whose token table is trained, stays float32.
      :func:`diffusion_loss` casts the UNet's inputs to its dtype and computes the loss in float32.
    Returns the stack."""
    if gradient_checkpointing:
        stack.unet.enable_gradient_checkpointing()
        text_encoder = stack.text_encoder
        if getattr(text_encoder, "supports_gradient_checkpointing", False):
            enable = getattr(text_encoder, "activation_checkpointing_enable", None) \
                or text_encoder.gradient_checkpointing_enable  # transformers 5 renamed it
            enable()
    dtype = precision_dtype(frozen_dtype) if not isinstance(frozen_dtype, torch.dtype) else frozen_dtype
    if dtype is not None:
        stack.unet.to(dtype)
        stack.vae.to(dtype)
    return stack
