"""Textual inversion as diffusers does it: a placeholder concept of n vectors learned in the token table.

A :class:`TextualInversion` adds the placeholder tokens ``<tok>, <tok>_1, …, <tok>_{n-1}`` (diffusers' names) to a
tokenizer (CLIP, or LDM's BERT) and rows for them to the text encoder's input-embedding table, initialised from a word
or from given vectors. Training optimises that table (:meth:`TextualInversion.trainable_parameters`) and, after each
optimizer step, :meth:`TextualInversion.restore_frozen_rows` copies every other row back bit for bit, so that only
the placeholder rows change (weight decay included). Prompts name the placeholder once (``"a photo of <tok>"``); it
is expanded to the n tokens, as diffusers' ``maybe_convert_prompt`` does.

The learned vectors are saved in diffusers' format (``{"<tok>": tensor(n, d)}`` safetensors), which
``StableDiffusionPipeline.load_textual_inversion`` reads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from anomgen.encoders.clip_text import (
    encode_with_embeddings,
    existing_token_id,
    expand_placeholder,
    load_concepts,
    placeholder_tokens,
    save_concepts,
    tokenize,
)

__all__ = ["TextualInversion", "placeholder_tokens"]


class TextualInversion:
    """A placeholder concept of ``num_vectors`` vectors added to ``tokenizer`` and ``text_encoder`` (in place).

    ``initializer``: a word (its token embeddings; a word of several tokens starts every vector at the mean of its
    tokens' embeddings, where diffusers' script refuses such a word) or vectors (d,) or (n, d) (e.g. another
    concept's, as ADP starts c_a from c_n). A placeholder that is already a token of the vocabulary is an error
    naming it. The table is snapshotted at construction: :meth:`restore_frozen_rows` puts every non-placeholder row
    back to that snapshot (call :meth:`snapshot` again if the table changes for another reason, e.g. another concept
    added later).
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, placeholder: str = "<concept>", num_vectors: int = 1,
                 initializer: str | torch.Tensor = "object") -> None:
        if not placeholder or re.search(r"\s", placeholder):
            raise ValueError(f"placeholder must be one non-empty word without spaces, got {placeholder!r}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.placeholder = placeholder
        self.tokens = placeholder_tokens(placeholder, int(num_vectors))
        for token in self.tokens:
            known = existing_token_id(tokenizer, token)
            if known is not None:
                raise ValueError(f"placeholder token {token!r} is already a token of the tokenizer's vocabulary (id "
                                 f"{known}): choose another placeholder, e.g. '<{placeholder.strip('<>')}-x>'")
        init = self._initial_vectors(initializer)  # before adding: the word's own tokens
        added = tokenizer.add_tokens(self.tokens)
        if added != len(self.tokens):
            raise ValueError(f"the tokenizer added {added} of the placeholder tokens {self.tokens}; expected all")
        self.token_ids = [int(i) for i in tokenizer.convert_tokens_to_ids(self.tokens)]
        spelled = tokenizer(" ".join(self.tokens), add_special_tokens=False).input_ids
        if list(spelled) != self.token_ids:
            raise ValueError(f"the tokenizer does not keep the placeholder tokens {self.tokens} whole (it gives ids "
                             f"{list(spelled)}, expected {self.token_ids}): use a lower-case placeholder")
        table = text_encoder.get_input_embeddings()
        if table.num_embeddings < len(tokenizer):
            text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            weight = self.embedding_weight
            weight[self.token_ids] = init.to(device=weight.device, dtype=weight.dtype)
        self.snapshot()

    # ------------------------------------------------------------------------------------------------ set-up

    def _initial_vectors(self, initializer: str | torch.Tensor) -> torch.Tensor:
        weight = self.text_encoder.get_input_embeddings().weight.detach()
        n, width = len(self.tokens), weight.shape[1]
        if isinstance(initializer, str):
            ids = self.tokenizer(initializer, add_special_tokens=False).input_ids
            if not ids:
                raise ValueError(f"initializer word {initializer!r} gives no tokens")
            return weight[ids].float().mean(dim=0, keepdim=True).expand(n, width).clone()
        vectors = torch.as_tensor(initializer).detach().float()
        vectors = vectors[None] if vectors.dim() == 1 else vectors
        if vectors.shape[-1] != width or vectors.shape[0] not in (1, n) or vectors.dim() != 2:
            raise ValueError(f"initializer vectors have shape {tuple(vectors.shape)}; expected ({width},) or "
                             f"({n}, {width}) for {n} vectors of the text encoder's width {width}")
        return vectors.expand(n, width).clone()

    @classmethod
    def load(cls, path: str | os.PathLike, tokenizer, text_encoder: nn.Module,
             placeholder: str | None = None) -> TextualInversion:
        """Add the concept of a concept file (:func:`~anomgen.encoders.clip_text.save_concepts`, diffusers' format) to
        ``tokenizer`` and ``text_encoder``. ``placeholder`` picks one concept of a file of several (and may not be
        omitted then). A file of another width than the text encoder is an error naming both."""
        width = text_encoder.get_input_embeddings().embedding_dim
        concepts = load_concepts(path, width=width)
        if placeholder is None:
            if len(concepts) != 1:
                raise ValueError(f"concept file {path} holds {len(concepts)} concepts ({', '.join(concepts)}): name "
                                 "the one to load as `placeholder`")
            placeholder = next(iter(concepts))
        if placeholder not in concepts:
            raise KeyError(f"concept file {path} has no concept {placeholder!r}; it has {', '.join(concepts)}")
        vectors = concepts[placeholder]
        return cls(tokenizer, text_encoder, placeholder, num_vectors=vectors.shape[0], initializer=vectors)

    # ------------------------------------------------------------------------------------------------ the table

    @property
    def num_vectors(self) -> int:
        return len(self.tokens)

    @property
    def embedding_weight(self) -> nn.Parameter:
        """The text encoder's input-embedding table (V × d), placeholder rows included. Fetched anew each time:
        resizing the table (another concept added) replaces the parameter."""
        return self.text_encoder.get_input_embeddings().weight

    def snapshot(self) -> None:
        """Remember the current table: :meth:`restore_frozen_rows` restores every non-placeholder row to it."""
        weight = self.embedding_weight.detach()
        self._frozen = weight.clone()
        self._keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        self._keep[self.token_ids] = False

    def freeze_text_encoder(self) -> list[nn.Parameter]:
        """Freeze every text-encoder parameter except the input-embedding table (diffusers' script: body, final
        norm and position embeddings frozen); returns :meth:`trainable_parameters`."""
        self.text_encoder.requires_grad_(False)
        self.embedding_weight.requires_grad_(True)
        return self.trainable_parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: the whole input-embedding table (only the placeholder rows are kept; see
        :meth:`restore_frozen_rows`)."""
        return [self.embedding_weight]

    @torch.no_grad()
    def restore_frozen_rows(self) -> None:
        """Copy every non-placeholder row of the table back from the snapshot, bit for bit. Call it after each
        optimizer step (AdamW's weight decay moves every row, and any other gradient would too)."""
        weight = self.embedding_weight
        if weight.shape != self._frozen.shape:
            raise RuntimeError(f"the embedding table has shape {tuple(weight.shape)} but its snapshot "
                               f"{tuple(self._frozen.shape)}: call snapshot() after changing the table (e.g. adding "
                               "another concept)")
        if self._frozen.device != weight.device:
            self._frozen, self._keep = self._frozen.to(weight.device), self._keep.to(weight.device)
        weight[self._keep] = self._frozen[self._keep]

    def learned_embeddings(self) -> torch.Tensor:
        """The concept's vectors (n × d, float32, detached copy)."""
        return self.embedding_weight.detach()[self.token_ids].float().clone()

    # ------------------------------------------------------------------------------------------------ prompts

    def expand(self, prompt: str) -> str:
        """``prompt`` with each mention of the placeholder replaced by the n tokens ``p p_1 … p_{n-1}`` (diffusers'
        ``maybe_convert_prompt``). Name the placeholder once per use; do not expand it yourself."""
        return expand_placeholder(prompt, self.placeholder, self.num_vectors)

    def input_ids(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Token ids (B × 77) of the expanded prompts, on the text encoder's device. A prompt that no longer fits
        once the placeholder is expanded to n tokens is an error naming the prompt, its length and the limit."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        limit = int(self.tokenizer.model_max_length)
        rows = []
        for prompt in prompts:
            expanded = self.expand(prompt)
            length = len(self.tokenizer(expanded).input_ids)
            if length > limit:
                raise ValueError(f"prompt {prompt!r} is {length} tokens long once {self.placeholder!r} is expanded to "
                                 f"its {self.num_vectors} vectors (start and end tokens included); the limit is "
                                 f"{limit}")
            rows.append(expanded)
        return tokenize(self.tokenizer, rows, max_length=limit).to(self.embedding_weight.device)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The table's embeddings of ``input_ids`` (B × L × d), with gradients to the table: what
        :func:`~anomgen.encoders.clip_text.encode_text_open_clip` takes to score the concept with open_clip."""
        return self.text_encoder.get_input_embeddings()(input_ids)

    def encode(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """The text encoder's hidden states (B × 77 × d) of the prompts with the learned vectors: the UNet's
        ``encoder_hidden_states``; gradients flow to the placeholder rows."""
        return encode_with_embeddings(self.text_encoder, self.input_ids(prompts))

    # ------------------------------------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike) -> Path:
        """Write the concept in diffusers' format, ``{placeholder: tensor(n, d)}`` safetensors (atomically); diffusers'
        ``pipe.load_textual_inversion(path)`` reads it."""
        return save_concepts(path, {self.placeholder: self.learned_embeddings()})
