"""WinCLIP and WinCLIP+ (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation", CVPR
2023): CLIP's image tower run on windows of patch tokens, scored against a prompt ensemble (zero-shot) and against
the windows of K normal images (few-shot).

How a score is made here:

- The image is resized to the CLIP's input size (240 px for ViT-B-16-plus-240: a 15 × 15 grid of 16 px patches) and
  normalised with the model's statistics.
- Embeddings at three levels, one forward of the image plus one of every window:
  the image embedding (the class token, as ``encode_image`` gives it); the patch tokens (the last layer's patch tokens
  after ``ln_post``, not projected); for each window size ``s`` in ``scales`` (2 and 3) every ``s × s`` window of the
  grid with stride 1, embedded as the class token of the visual transformer run on the class token and that window's
  patch tokens alone (the tokens as they enter the transformer: patch embedding + position embedding + ``ln_pre``;
  the other patches are masked out by leaving them out), then ``ln_post`` and the projection.
- Zero-shot: the text embeddings of the compositional prompt ensemble (every state of :data:`NORMAL_STATES` /
  :data:`ANOMALOUS_STATES` in every template of :data:`TEMPLATES`) are averaged per class as ``encode_text`` gives
  them; P(anomalous) = softmax(cos / :data:`TEMPERATURE`) over the two. The image score is P of the image embedding.
  The map: per window size, each patch gets the harmonic mean of the scores of the windows that cover it; then the
  harmonic mean, per patch, of the image score and those maps.
- Few-shot (WinCLIP+, :func:`few_shot_patch_scores`): the memory holds the K normal images' patch tokens and window
  embeddings of every size. Every query embedding scores min over the memory of its level of (1 − cos) / 2; the
  window scores are spread to patches by harmonic mean as above, and the map is the mean of the patch-level map and
  the window maps. With a memory, the final map is the mean of the zero-shot and few-shot maps, and the image score
  the mean of the zero-shot image score and the maximum of the few-shot map.
- Maps are upsampled bilinearly to the size of the images given.

anomalib 2.7's ``WinClipModel`` computes the same thing and is the test oracle (tests/detectors/test_winclip.py),
with one difference: with open_clip ≥ 2.24, whose transformer is batch-first, anomalib still transposes the window
tokens to sequence-first before the transformer, so attention runs across windows instead of within each, and every
window of an image gets the same embedding (anomalib issue #2571). Here the windows run batch-first; the test
corrects the oracle before comparing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomgen.detectors.maps import MapDetector
from anomgen.pixels import normalize, resize

#: states of a normal object ("{}" is the object word)
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
#: states of an anomalous object
ANOMALOUS_STATES = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
#: the templates every state is put in (as anomalib lists them: "a jpeg corrupted photo of the {}." twice, so it
#: weighs double in the average, and no "a cropped photo of a {}.")
TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)
#: the softmax temperature of the zero-shot scores (CLIP's initial one; not the model's learned logit scale)
TEMPERATURE = 0.07
#: window sizes, in patches
SCALES = (2, 3)


def prompt_ensemble(class_name: str = "object") -> tuple[list[str], list[str]]:
    """(normal prompts, anomalous prompts): every state with ``class_name`` in every template, states outermost."""
    normal = [template.format(state.format(class_name)) for state in NORMAL_STATES for template in TEMPLATES]
    anomalous = [template.format(state.format(class_name)) for state in ANOMALOUS_STATES for template in TEMPLATES]
    return normal, anomalous


def window_indices(grid: tuple[int, int], size: int, stride: int = 1) -> Tensor:
    """The patches of every ``size × size`` window of a ``grid`` (rows, columns) of patches: a long tensor
    W × size², windows in row-major order of their top-left patch, a window's patches in row-major order, patches
    numbered row-major."""
    rows, cols = grid
    if size < 1 or stride < 1 or size > rows or size > cols:
        raise ValueError(f"windows of {size} patches (stride {stride}) do not fit a {rows} × {cols} patch grid")
    ids = torch.arange(rows * cols).view(rows, cols)
    tops = range(0, rows - size + 1, stride)
    lefts = range(0, cols - size + 1, stride)
    return torch.stack([ids[r:r + size, c:c + size].reshape(-1) for r in tops for c in lefts])


def harmonic_mean(values: Tensor, dim: int = 0) -> Tensor:
    """Harmonic mean of non-negative ``values`` along ``dim``; 0 where any of them is 0."""
    count = values.shape[dim]
    return count / (1.0 / values).sum(dim=dim)  # 1 / 0 = inf -> count / inf = 0


def harmonic_aggregation(window_scores: Tensor, windows: Tensor, grid: tuple[int, int]) -> Tensor:
    """Per patch, the harmonic mean of the scores of the windows that cover it.

    ``window_scores`` B × W (non-negative), ``windows`` W × k (patch ids, :func:`window_indices`); returns
    B × rows × cols. A patch covered by a window of score 0 gets 0, one covered by no window 0."""
    rows, cols = grid
    if window_scores.shape[-1] != windows.shape[0]:
        raise ValueError(f"{window_scores.shape[-1]} window scores for {windows.shape[0]} windows")
    windows = windows.to(window_scores.device)
    cover = torch.zeros(rows * cols, windows.shape[0], dtype=torch.bool, device=window_scores.device)
    cover[windows, torch.arange(windows.shape[0], device=windows.device).unsqueeze(1)] = True  # P × W
    inverse = torch.where(cover, 1.0 / window_scores.unsqueeze(1), 0.0).sum(dim=-1)  # B × P
    count = cover.sum(dim=1).to(window_scores.dtype)
    scores = torch.where(count > 0, count / inverse, 0.0)
    return scores.view(-1, rows, cols)


def text_probabilities(embeddings: Tensor, text: Tensor, temperature: float = TEMPERATURE) -> Tensor:
    """P(anomalous) of embeddings ``... × D`` against the (normal, anomalous) text embeddings ``2 × D``: the softmax
    of the cosine similarities divided by ``temperature``; float64."""
    cosines = F.normalize(embeddings.double(), dim=-1) @ F.normalize(text.double().to(embeddings.device), dim=-1).T
    return (cosines / temperature).softmax(dim=-1)[..., 1]


def association_scores(embeddings: Tensor, memory: Tensor, chunk: int = 4096) -> Tensor:
    """min over ``memory`` (... × D) of (1 − cos) / 2 for every embedding of ``embeddings`` (... × D); float64.

    Computed ``chunk`` query embeddings at a time (the similarity matrix is chunk × M). Cosines that round above 1
    give 0, not a tiny negative score (whose inverse would upset a harmonic mean)."""
    memory = F.normalize(memory.reshape(-1, memory.shape[-1]).double().to(embeddings.device), dim=-1)
    queries = F.normalize(embeddings.reshape(-1, embeddings.shape[-1]).double(), dim=-1)
    scores = [(1.0 - part @ memory.T).amin(dim=-1).clamp_min(0.0) / 2.0 for part in queries.split(chunk)]
    return torch.cat(scores).view(embeddings.shape[:-1])


@dataclass
class WinCLIPFeatures:
    """The embeddings of B images at every level.

    ``image`` B × D (projected), ``windows`` one B × W_s × D per window size (projected), ``patches`` B × P × C
    (the patch tokens after ``ln_post``, not projected)."""

    image: Tensor
    windows: list[Tensor]
    patches: Tensor

    def __len__(self) -> int:
        return self.image.shape[0]

    def to(self, device: str | torch.device) -> WinCLIPFeatures:
        return WinCLIPFeatures(self.image.to(device), [w.to(device) for w in self.windows], self.patches.to(device))

    @staticmethod
    def cat(parts: Sequence[WinCLIPFeatures]) -> WinCLIPFeatures:
        """The features of every image of ``parts``, in order."""
        if not parts:
            raise ValueError("no features to concatenate")
        return WinCLIPFeatures(torch.cat([p.image for p in parts]),
                               [torch.cat(ws) for ws in zip(*(p.windows for p in parts), strict=True)],
                               torch.cat([p.patches for p in parts]))


class WinCLIPEncoder(nn.Module):
    """An open_clip ViT as WinCLIP uses it: [0, 1] images B × 3 × H × W -> :class:`WinCLIPFeatures`.

    ``model_name`` / ``pretrained`` as :class:`~anomgen.encoders.OpenCLIPImageEncoder` takes them (an open_clip tag,
    a weights file, or ``None`` for random weights), or ``clip``: an encoder already built (shared, not changed).
    ``scales``: the window sizes in patches. The model must be an open_clip ``VisionTransformer`` image tower.
    ``config``: an open_clip model config registered under ``model_name`` first (``pretrained=tiny``'s tiny ViT).
    """

    def __init__(self, model_name: str = "ViT-B-16-plus-240", pretrained: str | None = "laion400m_e31",
                 scales: Sequence[int] = SCALES, clip=None, config: Mapping | None = None) -> None:
        super().__init__()
        from open_clip.transformer import VisionTransformer

        from anomgen.encoders.clip import OpenCLIPImageEncoder

        if config is not None and clip is None:  # a model config in open_clip's format (tiny random models)
            from anomgen.encoders.clip_text import register_open_clip_config
            from anomgen.pretrained import plain_entry

            register_open_clip_config(model_name, plain_entry(config))

        self.clip = clip if clip is not None else OpenCLIPImageEncoder(model_name, pretrained).eval()
        visual = self.clip.model.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"WinCLIP needs an open_clip VisionTransformer image tower; {self.clip.model_name} has "
                             f"{type(visual).__name__}")
        self.grid_size: tuple[int, int] = tuple(visual.grid_size)
        self.scales = tuple(int(s) for s in scales)
        for i, size in enumerate(self.scales):
            self.register_buffer(f"windows_{i}", window_indices(self.grid_size, size), persistent=False)

    @property
    def windows(self) -> list[Tensor]:
        """The patch ids of every window, one W_s × s² tensor per window size (:func:`window_indices`)."""
        return [getattr(self, f"windows_{i}") for i in range(len(self.scales))]

    @property
    def model(self):
        """The open_clip model."""
        return self.clip.model

    @property
    def image_size(self) -> tuple[int, int]:
        return self.clip.image_size

    def preprocess(self, images: Tensor) -> Tensor:
        """[0, 1] RGB -> the model's input: bicubic antialiased resize to its size, its normalisation."""
        device = next(self.model.parameters()).device
        images = resize(images.to(device=device, dtype=torch.float32), self.image_size, mode="bicubic")
        return normalize(images, self.clip.mean, self.clip.std)

    @torch.no_grad()
    def forward(self, images: Tensor) -> WinCLIPFeatures:
        """The embeddings of [0, 1] images B × 3 × H × W (float32, on the model's device)."""
        return self.encode(self.preprocess(images))

    @torch.no_grad()
    def encode(self, inputs: Tensor) -> WinCLIPFeatures:
        """The embeddings of images already resized and normalised for the model (B × 3 × h × w).

        Uses open_clip's (3.3) ``VisionTransformer._embeds`` and ``_pool``, so that the image embedding and the patch
        tokens are exactly what ``encode_image`` (with ``output_tokens``) gives, whatever the pooling of the model."""
        visual = self.model.visual
        tokens = visual._embeds(inputs)  # B × (1 + P) × width: as the tokens enter the transformer (after ln_pre)
        pooled, patches = visual._pool(visual.transformer(tokens))
        image = self._project(pooled)
        return WinCLIPFeatures(image, [self._window_embeddings(tokens, w) for w in self.windows], patches)

    def _project(self, pooled: Tensor) -> Tensor:
        proj = self.model.visual.proj
        return pooled @ proj if proj is not None else pooled

    def _window_embeddings(self, tokens: Tensor, windows: Tensor) -> Tensor:
        """B × W × D: the transformer run on the class token and each window's patch tokens alone."""
        visual = self.model.visual
        batch, width = tokens.shape[0], tokens.shape[-1]
        index = torch.cat([torch.zeros_like(windows[:, :1]), windows + 1], dim=1)  # W × (1 + s²): class token first
        sequences = tokens[:, index].reshape(batch * index.shape[0], index.shape[1], width)
        pooled, _ = visual._pool(visual.transformer(sequences))
        return self._project(pooled).view(batch, index.shape[0], -1)

    @torch.no_grad()
    def text_embeddings(self, class_name: str) -> Tensor:
        """2 × D (normal, anomalous): the mean ``encode_text`` output (not normalised) over each class's prompts of
        :func:`prompt_ensemble`."""
        normal, anomalous = prompt_ensemble(class_name)
        device = next(self.model.parameters()).device
        tokens = self.clip.tokenizer(normal + anomalous).to(device)
        embeddings = self.model.encode_text(tokens).float()
        return torch.stack([embeddings[:len(normal)].mean(dim=0), embeddings[len(normal):].mean(dim=0)])


def zero_shot_scores(features: WinCLIPFeatures, text: Tensor, windows: Sequence[Tensor], grid: tuple[int, int],
                     temperature: float = TEMPERATURE) -> tuple[Tensor, Tensor]:
    """(image scores B, patch maps B × rows × cols), float64: P(anomalous) of the image, and per patch the harmonic
    mean of the image score and of each window size's harmonic aggregation of window scores."""
    image = text_probabilities(features.image, text, temperature)
    maps = [image.view(-1, 1, 1).expand(-1, *grid)]
    for embeddings, ids in zip(features.windows, windows, strict=True):
        maps.append(harmonic_aggregation(text_probabilities(embeddings, text, temperature), ids, grid))
    return image, harmonic_mean(torch.stack(maps), dim=0)


def few_shot_patch_scores(features: WinCLIPFeatures, memory: WinCLIPFeatures, windows: Sequence[Tensor],
                          grid: tuple[int, int]) -> Tensor:
    """WinCLIP+'s few-shot map (B × rows × cols, float64) of query ``features`` against the ``memory`` of K normal
    images (both from the same :class:`WinCLIPEncoder`, whose ``windows`` and ``grid_size`` are passed): the mean of
    the patch-level map and, per window size, the harmonic aggregation of window scores, each score being
    min over the memory of that level of (1 − cos) / 2. An image in the memory scores 0 everywhere."""
    maps = [association_scores(features.patches, memory.patches).view(-1, *grid)]
    for embeddings, bank, ids in zip(features.windows, memory.windows, windows, strict=True):
        maps.append(harmonic_aggregation(association_scores(embeddings, bank), ids, grid))
    return torch.stack(maps).mean(dim=0)


class WinCLIP(MapDetector):
    """WinCLIP (zero-shot) and WinCLIP+ (few-shot) anomaly detection and localisation; higher is more anomalous.

    ``class_name``: the object word of the prompts; ``None`` takes each record's ``category`` (underscores read as
    spaces, "object" when a batch has none). ``few_shot``: :meth:`fit` keeps the support images as the memory
    (WinCLIP+); without it :meth:`fit` does nothing and scores are zero-shot, as they are before any fit.
    ``model_name`` / ``pretrained``: the open_clip model and its weights (found as
    :class:`~anomgen.encoders.OpenCLIPImageEncoder` finds them; ``None``: random). ``device``: ``"auto"`` (CUDA when
    available) or a torch device. ``config``: an open_clip model config registered under ``model_name`` (tiny models).
    """

    #: every score and map value lies in [0, 1] (probabilities, (1 − cos) / 2, their harmonic and arithmetic means;
    #: bilinear upsampling stays inside the range): the ``score_range`` of binned pixel metrics (evaluate.py)
    map_range = (0.0, 1.0)

    def __init__(self, class_name: str | None = None, model_name: str = "ViT-B-16-plus-240",
                 pretrained: str | None = "laion400m_e31", scales: Sequence[int] = SCALES, few_shot: bool = True,
                 temperature: float = TEMPERATURE, device: str | torch.device = "auto",
                 name: str = "winclip", config: Mapping | None = None) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.encoder = WinCLIPEncoder(model_name, pretrained, scales, config=config).to(self.device).eval()
        self.class_name = class_name
        self.few_shot = few_shot
        self.temperature = float(temperature)
        self.name = name
        self.memory: WinCLIPFeatures | None = None
        self._text: dict[str, Tensor] = {}

    @property
    def k_shot(self) -> int:
        """The number of normal images in the few-shot memory (0: zero-shot)."""
        return 0 if self.memory is None else len(self.memory)

    def text_embeddings(self, class_name: str) -> Tensor:
        """(normal, anomalous) text embeddings 2 × D of ``class_name`` (computed once per word)."""
        if class_name not in self._text:
            self._text[class_name] = self.encoder.text_embeddings(class_name)
        return self._text[class_name]

    def fit(self, batches: Iterable[dict]) -> WinCLIP:
        """WinCLIP+: the images of ``batches`` (K normal images) become the few-shot memory (replacing any). Zero-shot
        (``few_shot=False``): nothing is kept."""
        if not self.few_shot:
            return self
        parts = [self.encoder(batch["image"]) for batch in batches]
        if not parts:
            raise ValueError(f"{self.name}: no support images for the few-shot memory")
        self.memory = WinCLIPFeatures.cat(parts)
        return self

    def _words(self, batch: dict) -> list[str]:
        if self.class_name is not None:
            return [self.class_name] * len(batch["image"])
        categories = batch.get("category")
        if categories is None:
            return ["object"] * len(batch["image"])
        return [str(c).replace("_", " ") for c in categories]

    def predict_images(self, images: Tensor, class_name: str | Sequence[str] = "object") -> tuple[Tensor, Tensor]:
        """(image scores B float64, pixel maps B × H × W float32) of [0, 1] images B × 3 × H × W, the maps at the
        images' size; ``class_name``: one word, or one per image."""
        words = [class_name] * len(images) if isinstance(class_name, str) else list(class_name)
        if len(words) != len(images):
            raise ValueError(f"{len(words)} class names for {len(images)} images")
        encoder = self.encoder
        features = encoder(images)
        scores = torch.empty(len(images), dtype=torch.float64, device=self.device)
        maps = torch.empty(len(images), *encoder.grid_size, dtype=torch.float64, device=self.device)
        for word in dict.fromkeys(words):
            rows = torch.tensor([i for i, w in enumerate(words) if w == word], device=self.device)
            part = WinCLIPFeatures(features.image[rows], [w[rows] for w in features.windows], features.patches[rows])
            scores[rows], maps[rows] = zero_shot_scores(part, self.text_embeddings(word), encoder.windows,
                                                        encoder.grid_size, self.temperature)
        if self.memory is not None:
            few_shot = few_shot_patch_scores(features, self.memory, encoder.windows, encoder.grid_size)
            maps = (maps + few_shot) / 2.0
            scores = (scores + few_shot.amax(dim=(-2, -1))) / 2.0
        pixels = F.interpolate(maps.unsqueeze(1), size=tuple(images.shape[-2:]), mode="bilinear", align_corners=False)
        return scores.cpu(), pixels.squeeze(1).float().cpu()

    def predict_batch(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(image scores B, pixel maps B × H × W at the images' size) of one record batch, its words as prompts."""
        return self.predict_images(batch["image"], self._words(batch))
