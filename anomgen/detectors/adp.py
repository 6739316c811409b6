"""ADP: few-shot anomaly detection with personalised concepts (METHODS.md §3).

Two learned text concepts describe the object: ``c_n`` (normal-aware, Eq. 3) and ``c_a`` (anomaly-aware, Eq. 4).
Each is scored by CLIP in two states, S_n(c) = "flawless [c]" and S_a(c) = "damaged [c]", inside prompt templates.

- P_CLIP (Eq. 1): a state's text embedding is **averaged over the templates first**,
  G_s(c) = (1/|T|) Σ_T g(T(S_s(c))) with g the L2-normalised CLIP text embedding; then one softmax over the two
  states of cos(f(x), G_s(c)) / τ. (Averaging the per-template probabilities is a different thing.)
- w(c) (Eq. 5): mean_i P(S_n(c) | x_i) over the normal shots + mean_j P(S_a(c) | x̃_j) over the pseudo-anomalies.
- Prototypes (Eq. 6): p_s = Σ_c w(c) G_s(c) / Σ_c w(c), over c_n and c_a (and the label word ℓ for ADP_ℓ);
  the mean over the templates is inside G. (Dividing by Σ w changes no cosine.)
- ADP(x) (Eq. 7) = the softmax of sim(f(x), p_n)/τ and sim(f(x), p_a)/τ taken at p_n: **P(normal)**. The anomaly
  score is 1 − ADP(x).
- The concept-learning terms: Eq. 3 adds α · P_CLIP(S_n(c) | x_i) to the textual-inversion objective; as a loss to
  minimise it is ``−α · mean_i P``. Eq. 4 subtracts α Σ_j (P_CLIP(S_n(c) | x̃_j) − γ)⁺ over the pseudo-anomalies;
  as a loss it is ``+α · mean_j (P − γ)⁺`` (the mean rather than the sum keeps α independent of the number of
  pseudo-anomalies in a batch; *(check)*).

The functions here take embeddings; :class:`ADPDetector` runs CLIP and adds the WinCLIP-style few-shot patch score.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

#: the two states of a concept (METHODS.md §3): index 0 normal, 1 anomalous
STATES: tuple[str, str] = ("flawless {}", "damaged {}")
#: prompt templates T *(check: the paper gives "a photo of [c]" as its example and no list)*
TEMPLATES: tuple[str, ...] = (
    "a photo of {}.",
    "a cropped photo of {}.",
    "a close-up photo of {}.",
    "a bright photo of {}.",
    "a dark photo of {}.",
    "a photo of the {}.",
    "a blurry photo of {}.",
)
#: CLIP's own temperature (logit scale 100) *(check: the paper does not give τ)*
DEFAULT_TAU = 0.01


def state_prompts(concept: str, templates: Sequence[str] = TEMPLATES,
                  states: Sequence[str] = STATES) -> list[list[str]]:
    """The prompts of each state of ``concept``: ``[[T(S_n(c)) for T], [T(S_a(c)) for T]]``."""
    if not templates:
        raise ValueError("ADP needs at least one prompt template")
    return [[template.format(state.format(concept)) for template in templates] for state in states]


def averaged_state_embeddings(encode: Callable[[list[str]], Tensor], concept: str,
                              templates: Sequence[str] = TEMPLATES, states: Sequence[str] = STATES) -> Tensor:
    """G_s(c) for both states (2 × D): the mean over the templates of the L2-normalised text embeddings.

    ``encode`` maps a list of prompts to their embeddings (N × D); gradients flow through it (concept learning)."""
    prompts = state_prompts(concept, templates, states)
    flat = encode([p for group in prompts for p in group])
    embeddings = F.normalize(flat.float(), dim=-1).view(len(states), len(templates), -1)
    return embeddings.mean(dim=1)


def state_probabilities(image_features: Tensor, state_embeddings: Tensor, tau: float = DEFAULT_TAU) -> Tensor:
    """P_CLIP(state | x) (B × 2, Eq. 1): one softmax over the states of cos(f(x), G_s) / τ."""
    if state_embeddings.dim() != 2 or state_embeddings.shape[0] != 2:
        raise ValueError(f"expected the two state embeddings as 2 × D, got {tuple(state_embeddings.shape)}")
    if image_features.dim() != 2 or image_features.shape[1] != state_embeddings.shape[1]:
        raise ValueError(f"image features {tuple(image_features.shape)} do not fit text embeddings "
                         f"{tuple(state_embeddings.shape)}")
    if tau <= 0:
        raise ValueError(f"the temperature tau must be > 0, got {tau}")
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(state_embeddings.float().to(images.device), dim=-1)
    return (images @ texts.T / tau).softmax(dim=-1)


def concept_weight(normal_probabilities: Tensor, pseudo_anomaly_probabilities: Tensor) -> Tensor:
    """w(c) (Eq. 5) from P_CLIP on the normal shots and on the pseudo-anomalies (each N × 2, as
    :func:`state_probabilities` returns them): mean P(S_n | x_i) + mean P(S_a | x̃_j), in [0, 2]."""
    if len(normal_probabilities) == 0 or len(pseudo_anomaly_probabilities) == 0:
        raise ValueError("w(c) needs at least one normal image and one pseudo-anomaly")
    return normal_probabilities[:, 0].mean() + pseudo_anomaly_probabilities[:, 1].mean()


def prototypes(state_embeddings: Sequence[Tensor], weights: Sequence[Tensor | float]) -> Tensor:
    """p_n and p_a (2 × D, Eq. 6): the w-weighted mean of the concepts' template-averaged state embeddings."""
    if not state_embeddings or len(state_embeddings) != len(weights):
        raise ValueError(f"one weight per concept: {len(state_embeddings)} concepts, {len(weights)} weights")
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float32)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"concept weights must be >= 0 with a positive sum, got {w.tolist()}")
    stacked = torch.stack([e.float() for e in state_embeddings])  # C × 2 × D
    return (w.to(stacked.device)[:, None, None] * stacked).sum(0) / w.sum()


def normal_probability(image_features: Tensor, prototype_embeddings: Tensor, tau: float = DEFAULT_TAU) -> Tensor:
    """ADP(x) (Eq. 7, B): the softmax of the similarities to p_n and p_a over τ, at p_n. This is P(normal); the
    anomaly score is ``1 - normal_probability``."""
    return state_probabilities(image_features, prototype_embeddings, tau)[:, 0]


def normal_concept_loss(normal_probabilities: Tensor, alpha: float) -> Tensor:
    """The CLIP term of Eq. 3 as a loss: −α · mean_i P(S_n(c) | x_i) (normal shots judged normal)."""
    return -alpha * normal_probabilities[:, 0].mean()


def anomaly_concept_loss(pseudo_anomaly_probabilities: Tensor, alpha: float, gamma: float) -> Tensor:
    """The pseudo-anomaly term of Eq. 4 as a loss: α · mean_j (P(S_n(c) | x̃_j) − γ)⁺ (pseudo-anomalies not judged
    normal beyond the margin γ)."""
    return alpha * (pseudo_anomaly_probabilities[:, 0] - gamma).clamp(min=0).mean()


@torch.no_grad()
def pseudo_anomaly_features(model, folder: str, size: tuple[int, int], what: str = "pseudo_anomalies",
                            batch_size: int = 32) -> Tensor:
    """L2-normalised CLIP image embeddings (N × D) of the anomalies of the synthetic set ``folder`` (read at
    ``size``), in batches; an empty set is an error naming ``what`` and the folder."""
    from anomgen.data.synthetic import SyntheticSet
    from anomgen.encoders.clip import embed_images

    pseudo = SyntheticSet(folder, image_size=tuple(size), labels=(1,))
    if len(pseudo) == 0:
        raise ValueError(f"{what}: the pseudo-anomaly set {folder} holds no images")
    device = next(model.parameters()).device
    chunks = [torch.stack([pseudo[j]["image"] for j in range(i, min(i + batch_size, len(pseudo)))])
              for i in range(0, len(pseudo), batch_size)]
    return torch.cat([embed_images(model, c.to(device)) for c in chunks])


class ADPDetector:
    """ADP's detector (Eq. 5–7) with the WinCLIP-style few-shot patch score; higher scores are more anomalous.

    ``concepts``: ``{name: concept file}`` (the concept stages' ``concept`` outputs, diffusers' format), scored by the
    open_clip classifier ``clip`` (``pretrained.adp_clip``: ``model_name``, ``pretrained``, ``config``) through the
    shared token table (:class:`~anomgen.encoders.clip_text.ConceptTextEncoder`). ``label_word``: ADP_ℓ adds the
    class word ℓ as one more concept with its own weight w(ℓ) (underscores read as spaces).

    :meth:`fit` on the K normal shots computes each concept's w(c) (Eq. 5) from P_CLIP on the shots and on the
    pseudo-anomalies of the synthetic set ``pseudo_anomalies`` (the self-tuning stage's output), then the prototypes
    p_n, p_a (Eq. 6); the shots also become the few-shot patch memory. One concept and no pseudo-anomalies is the
    ablation "that concept alone" (its w cancels). The image score is
    ``(1 − patch_weight) · (1 − ADP(x)) + patch_weight · max few-shot map`` (WinCLIP+'s rule of combining with equal
    weights at 0.5 *(check: the paper does not state it)*; ``patch_weight: 0`` leaves ADP alone). The patch score's
    CLIP is ``patch_clip`` (``model_name``, ``pretrained``; WinCLIP's ViT-B-16-plus-240 by default *(check)*).
    """

    def __init__(self, concepts: Mapping[str, str], clip: Mapping, pseudo_anomalies: str | None = None,
                 label_word: str | None = None, templates: Sequence[str] | None = None, tau: float = DEFAULT_TAU,
                 patch_weight: float = 0.5, patch_clip: Mapping | None = None, scales: Sequence[int] = (2, 3),
                 device: str = "auto", name: str = "adp") -> None:
        from anomgen.encoders.clip_text import ConceptTextEncoder, load_concepts, load_open_clip, text_width
        from anomgen.pretrained import plain_entry

        if not concepts:
            raise ValueError(f"{name}: give at least one concept file (concepts: {{name: path}})")
        if not 0.0 <= patch_weight <= 1.0:
            raise ValueError(f"{name}: patch_weight must be in [0, 1], got {patch_weight}")
        if len(concepts) + bool(label_word) > 1 and not pseudo_anomalies:
            raise ValueError(f"{name}: weighting {len(concepts) + bool(label_word)} concepts needs pseudo_anomalies "
                             "(a synthetic set) for w(c) (Eq. 5)")
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else "cpu" if device == "auto" else device)
        self.name, self.tau, self.templates = name, float(tau), tuple(templates or TEMPLATES)
        self.patch_weight = float(patch_weight)
        self.pseudo_anomalies = pseudo_anomalies
        clip = plain_entry(clip)
        self.model = load_open_clip(**clip).to(self.device).eval()
        width = text_width(self.model)
        vectors = {}
        self.placeholders: dict[str, str] = {}
        for concept_name, path in concepts.items():
            loaded = load_concepts(path, width=width)
            if len(loaded) != 1:
                raise ValueError(f"{name}: concept file {path} holds {len(loaded)} concepts; expected one")
            placeholder, v = next(iter(loaded.items()))
            if placeholder in vectors:
                raise ValueError(f"{name}: concepts {concept_name!r} and another use the same placeholder "
                                 f"{placeholder!r}")
            vectors[placeholder] = v
            self.placeholders[str(concept_name)] = placeholder
        if label_word:
            self.placeholders["label"] = str(label_word).replace("_", " ")
        self.text = ConceptTextEncoder(self.model, vectors)
        self.patch = None
        if self.patch_weight > 0:
            from anomgen.detectors.winclip import WinCLIPEncoder

            patch_clip = plain_entry(patch_clip)
            self.patch = WinCLIPEncoder(patch_clip.get("model_name", "ViT-B-16-plus-240"),
                                        patch_clip.get("pretrained", "laion400m_e31"), scales,
                                        config=patch_clip.get("config")).to(self.device).eval()
        self.weights: dict[str, float] = {}
        self.prototypes: Tensor | None = None
        self.memory = None

    def state_embeddings(self) -> dict[str, Tensor]:
        """G_s(c) (2 × D) of every concept (and of the label word)."""
        return {n: averaged_state_embeddings(self.text.encode, word, self.templates)
                for n, word in self.placeholders.items()}

    @torch.no_grad()
    def image_features(self, images: Tensor) -> Tensor:
        from anomgen.encoders.clip import embed_images

        return embed_images(self.model, images.to(self.device))

    def _features(self, batches: Iterable[dict]) -> tuple[Tensor, list[Tensor]]:
        feats, images = [], []
        for batch in batches:
            images.append(batch["image"])
            feats.append(self.image_features(batch["image"]))
        if not feats:
            raise ValueError(f"{self.name}: no images")
        return torch.cat(feats), images

    @torch.no_grad()
    def fit(self, batches: Iterable[dict]) -> ADPDetector:
        """The K normal shots: w(c) of every concept, the prototypes and the few-shot patch memory."""
        from anomgen.detectors.winclip import WinCLIPFeatures

        shots, images = self._features(batches)
        states = self.state_embeddings()
        if len(states) == 1:
            self.weights = {next(iter(states)): 1.0}
        else:
            pseudo = pseudo_anomaly_features(self.model, self.pseudo_anomalies, images[0].shape[-2:], self.name)
            self.weights = {n: float(concept_weight(state_probabilities(shots, g, self.tau),
                                                    state_probabilities(pseudo, g, self.tau)))
                            for n, g in states.items()}
        self.prototypes = prototypes(list(states.values()), list(self.weights.values()))
        if self.patch is not None:
            self.memory = WinCLIPFeatures.cat([self.patch(x) for x in images])
        return self

    @torch.no_grad()
    def score(self, batches: Iterable[dict]) -> Tensor:
        """Anomaly scores (N, float64, CPU) of every record batch in ``batches``."""
        from anomgen.detectors.winclip import few_shot_patch_scores

        if self.prototypes is None:
            raise ValueError(f"{self.name}: call fit on the normal shots first")
        scores = []
        for batch in batches:
            images = batch["image"]
            s = 1.0 - normal_probability(self.image_features(images), self.prototypes, self.tau).double()
            if self.patch is not None:
                maps = few_shot_patch_scores(self.patch(images), self.memory, self.patch.windows,
                                             self.patch.grid_size)
                s = (1 - self.patch_weight) * s + self.patch_weight * maps.amax(dim=(-2, -1)).to(s.device)
            scores.append(s.cpu())
        if not scores:
            raise ValueError(f"{self.name}: no images to score")
        return torch.cat(scores)
