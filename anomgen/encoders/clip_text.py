"""The CLIP text side shared by the text-to-image stack (:mod:`anomgen.diffusion`) and the CLIP detectors.

- :func:`clip_tokenizer`: a transformers ``CLIPTokenizer`` built offline from open_clip's shipped BPE vocabulary (the
  same ids as ``open_clip.get_tokenizer``; padding with ``"!"`` (id 0) as Stable Diffusion 2.x and open_clip do).
- :func:`load_open_clip`: a full open_clip model (weights found by :mod:`anomgen.pretrained`, or random), a config
  given as data registered under its name first (the tiny test-size models).
- :func:`clip_text_model_from_open_clip`: the Stable Diffusion 2.x conversion of an open_clip text tower into a
  transformers ``CLIPTextModel`` (last residual block and projection dropped, final layer norm on the penultimate
  output). The two share the token table, so a learned token vector transfers between them.
- :func:`token_embeddings` / :func:`encode_with_embeddings`: the one way to encode text from token embeddings
  (B × L × d) instead of ids, for ``CLIPTextModel`` (a hook on its embeddings, whose transformers 5 ``forward`` has
  no ``inputs_embeds``) and for ``LDMBertModel`` (whose forward has).
- :func:`encode_text_open_clip`: open_clip text features from ids and optional token embeddings, pooled at the
  end-token position (open_clip's own ``argmax`` pooling picks an added id ≥ 49408 instead).
- :func:`save_concepts` / :func:`load_concepts`: learned token vectors in diffusers' textual-inversion format.

Heavy imports (transformers, open_clip, safetensors) happen inside the functions.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomgen.encoders.clip import open_clip_architecture
from anomgen.files import atomic_dir, write_atomic
from anomgen.pretrained import load_state_dict_strict, load_torch_file, open_clip_weights

#: the CLIP BPE vocabulary: 256 bytes, 256 end-of-word bytes, 48,894 merges, start and end of text
CLIP_VOCAB_SIZE = 49408
#: ``<|startoftext|>`` (open_clip: ``<start_of_text>``)
CLIP_SOT_ID = 49406
#: ``<|endoftext|>`` (open_clip: ``<end_of_text>``): open_clip and SD 2.x pool the text at its first occurrence
CLIP_EOT_ID = 49407
#: the context length of CLIP text models and of the Stable Diffusion pipelines
CLIP_CONTEXT_LENGTH = 77

#: the name and config of the tiny random open_clip model of ``pretrained=tiny`` (ADP's classifier and the text
#: encoder of the tiny text-to-image stack): CLIP's real vocabulary and context length, a 2-layer text transformer of
#: width 32 (the SD 2.x conversion keeps 1 layer), a 32 px ViT. ``configs/pretrained/tiny.yaml`` repeats it.
TINY_OPEN_CLIP_NAME = "anomgen-tiny-text-clip"
TINY_OPEN_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


# ------------------------------------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map of the 256 bytes to printable characters (the first 512 vocabulary entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def _clip_bpe_file() -> Path:
    import open_clip.tokenizer

    return Path(open_clip.tokenizer.default_bpe())


def clip_bpe_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding ``vocab.json`` and ``merges.txt`` of CLIP's BPE, written once from open_clip's shipped
    ``bpe_simple_vocab_16e6.txt.gz`` (no download). It lives in ``cache_dir`` (default: the system's temporary
    folder), named by a hash of the BPE file; it is built atomically, so concurrent processes can share it."""
    bpe = _clip_bpe_file()
    digest = hashlib.sha256(bpe.read_bytes()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
    folder = root / f"anomgen-clip-bpe-{digest}"
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return folder
    lines = gzip.open(bpe).read().decode("utf-8").split("\n")
    merges = lines[1: 49152 - 256 - 2 + 1]  # the merges open_clip's SimpleTokenizer uses
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"{bpe}: expected a CLIP vocabulary of {CLIP_VOCAB_SIZE} entries, built {len(vocab)}")
    with atomic_dir(folder, exist_ok=True) as tmp:
        (tmp / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False),
                                        encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


def clip_tokenizer(model_max_length: int = CLIP_CONTEXT_LENGTH, cache_dir: str | os.PathLike | None = None):
    """A transformers ``CLIPTokenizer`` of CLIP's BPE vocabulary (49,408 tokens), built offline from open_clip's
    shipped vocabulary (:func:`clip_bpe_folder`). It pads with ``"!"`` (id 0), as SD 2.x's tokenizer and open_clip do,
    so ``tokenizer(texts, padding="max_length").input_ids`` equals ``open_clip.get_tokenizer(...)(texts)`` for text
    that fits. Each call returns a new tokenizer (adding tokens to one does not change another).

    As in SD 2.x's own tokenizer, ``"!"`` is the pad token, so a ``"!"`` inside a text is id 0 too (open_clip gives it
    id 256, ``"!</w>"``): keep ``"!"`` out of prompts that must agree with open_clip."""
    from transformers import CLIPTokenizer

    if int(model_max_length) < 2:
        raise ValueError(f"clip_tokenizer: model_max_length must be at least 2 (start and end token), "
                         f"got {model_max_length}")
    tokenizer = CLIPTokenizer.from_pretrained(str(clip_bpe_folder(cache_dir)), pad_token="!",
                                              model_max_length=int(model_max_length))
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"clip_tokenizer: built a vocabulary of {len(tokenizer)} tokens, expected "
                           f"{CLIP_VOCAB_SIZE} (transformers changed how CLIPTokenizer reads vocab.json/merges.txt?)")
    return tokenizer


def tokenize(tokenizer, prompts: str | list[str], max_length: int | None = None) -> torch.Tensor:
    """Token ids (B × ``max_length``, default the tokenizer's ``model_max_length``) of ``prompts``, padded to that
    length. A prompt longer than that is an error naming it, its length and the limit (nothing is cut silently)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    limit = int(max_length or tokenizer.model_max_length)
    ids = tokenizer(prompts, padding="max_length", max_length=limit, truncation=False).input_ids
    for prompt, row in zip(prompts, ids):
        if len(row) > limit:
            raise ValueError(f"prompt {prompt!r} is {len(row)} tokens long (start and end tokens included); the "
                             f"limit is {limit}")
    return torch.tensor(ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------- open_clip


def register_open_clip_config(model_name: str, config: Mapping[str, Any],
                              cache_dir: str | os.PathLike | None = None) -> str:
    """Register the open_clip model config ``config`` (a dict as in open_clip's ``model_configs/*.json``) under
    ``model_name`` (the mechanism the tests' tiny configs use: ``open_clip.add_model_config``). Registering the same
    config again is a no-op; a different config under a name open_clip already knows is an error naming it."""
    import open_clip

    config = json.loads(json.dumps(dict(config)))  # plain JSON data (an OmegaConf DictConfig too)
    known = open_clip.get_model_config(model_name)
    if known is not None:
        if known == config:
            return model_name
        raise ValueError(f"open_clip model {model_name!r} is already registered with another config ({known}); "
                         f"give the config {config} another name")
    root = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir())
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    path = write_atomic(root / f"anomgen-open-clip-{digest}" / f"{model_name}.json", json.dumps(config))
    open_clip.add_model_config(path)
    return model_name


def load_open_clip(model_name: str, pretrained: str | os.PathLike | None = None,
                   config: Mapping[str, Any] | None = None, seed: int = 0) -> nn.Module:
    """The full open_clip model ``model_name`` in eval mode (ADP's classifier: ViT-H-14, ``laion2b_s32b_b79k``).

    ``pretrained`` is an open_clip tag or a weights file, found by :func:`anomgen.pretrained.open_clip_weights`
    (offline-safe, a clear error when absent) and loaded strictly; ``None`` gives random weights. ``config`` (a dict
    in open_clip's format) is registered under ``model_name`` first (:func:`register_open_clip_config`): the tiny
    random models of ``pretrained=tiny``."""
    import open_clip

    if config is not None:
        register_open_clip_config(model_name, config)
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"open_clip has no model config {model_name!r} (and none was given as `config`)")
    weights = None if pretrained is None else str(open_clip_weights(model_name, pretrained))
    architecture = open_clip_architecture(model_name, None if pretrained is None else str(pretrained))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(architecture, pretrained=weights).eval()


def _text_tower(open_clip_model: nn.Module) -> nn.Module:
    """The module holding the text tower's parts (``token_embedding``, ``positional_embedding``, ``transformer``,
    ``ln_final``, ``text_projection``, ``attn_mask``): the model itself (``CLIP``) or its ``text`` (``CustomTextCLIP``).
    Only the standard causal CLIP text transformer is supported."""
    tower = getattr(open_clip_model, "text", open_clip_model)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    missing = [name for name in needed if not hasattr(tower, name)]
    if missing:
        raise TypeError(f"{type(open_clip_model).__name__} has no CLIP text tower (missing {', '.join(missing)}); "
                        "expected an open_clip CLIP model with a causal text transformer")
    if getattr(tower, "cls_emb", None) is not None:
        raise TypeError(f"{type(open_clip_model).__name__}: text towers with a class token are not supported")
    return tower


def text_width(open_clip_model: nn.Module) -> int:
    """The width of an open_clip model's token table (the width a learned concept for it must have)."""
    return int(_text_tower(open_clip_model).token_embedding.embedding_dim)


def end_token_positions(input_ids: torch.Tensor, eot_id: int = CLIP_EOT_ID) -> torch.Tensor:
    """The position of the first end token (``eot_id``) in each row of ``input_ids`` (B × L). A row without one
    is an error naming the row."""
    hits = input_ids == eot_id
    missing = (~hits.any(dim=-1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"rows {missing} of input_ids hold no end token (id {eot_id}): expected every sequence to "
                         "end with it (was it truncated by hand?)")
    return hits.int().argmax(dim=-1)


def encode_text_open_clip(open_clip_model: nn.Module, input_ids: torch.Tensor,
                          token_embeds: torch.Tensor | None = None, normalize: bool = False) -> torch.Tensor:
    """open_clip text features (B × embed_dim, projection applied) of ``input_ids`` (B × L, L ≤ the context length).

    ``token_embeds`` (B × L × width), when given, replaces the token-table lookup: a learned vector for an added id
    (≥ 49408, which open_clip's table does not hold) or per-sample vectors; gradients flow into it. The features are
    pooled at the first end token (id 49407), not at ``argmax`` of the ids as open_clip's ``encode_text`` does, so
    added ids do not move the pooling. For ordinary text this equals ``open_clip_model.encode_text(input_ids)``."""
    tower = _text_tower(open_clip_model)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be B × L, got shape {tuple(input_ids.shape)}")
    batch, length = input_ids.shape
    context = tower.positional_embedding.shape[0]
    if length > context:
        raise ValueError(f"input_ids are {length} tokens long; the open_clip model's context length is {context}")
    cast_dtype = tower.transformer.get_cast_dtype()
    if token_embeds is None:
        token_embeds = tower.token_embedding(input_ids)
    elif tuple(token_embeds.shape) != (batch, length, tower.positional_embedding.shape[1]):
        raise ValueError(f"token_embeds have shape {tuple(token_embeds.shape)}; expected "
                         f"{(batch, length, tower.positional_embedding.shape[1])} (input_ids B × L × width)")
    x = token_embeds.to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
    mask = getattr(tower, "attn_mask", None)
    x = tower.transformer(x, attn_mask=None if mask is None else mask[:length, :length])
    x = tower.ln_final(x)
    x = x[torch.arange(batch, device=x.device), end_token_positions(input_ids).to(x.device)]
    projection = tower.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, nn.Module) else x @ projection
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


# ------------------------------------------------------------------------------------------ SD 2.x text encoder


def clip_text_model_from_open_clip(open_clip_model: nn.Module, drop_last_layers: int = 1):
    """The Stable Diffusion 2.x text encoder made from an open_clip text tower: a transformers ``CLIPTextModel``
    holding the tower without its last ``drop_last_layers`` residual blocks and without the projection; its final
    layer norm (the tower's ``ln_final``) is applied to the output of the last kept block (SD 2.x: the penultimate).

    Hidden size, heads, MLP width, layers, context length, vocabulary and activation (gelu or quick_gelu) come from
    the open_clip model; the weights are copied (loaded strictly), so the two share the token table's values. The
    model is in eval mode, in the tower's dtype, on the CPU."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tower = _text_tower(open_clip_model)
    blocks = tower.transformer.resblocks
    layers = len(blocks) - int(drop_last_layers)
    if drop_last_layers < 0 or layers < 1:
        raise ValueError(f"drop_last_layers={drop_last_layers}: the open_clip text tower has {len(blocks)} blocks; "
                         "at least one must be kept")
    first = blocks[0]
    if not isinstance(getattr(first, "attn", None), nn.MultiheadAttention) or hasattr(first, "ln_1_kv") \
            or not isinstance(getattr(first, "ls_1", nn.Identity()), nn.Identity):
        raise TypeError("clip_text_model_from_open_clip supports open_clip's default residual blocks "
                        "(nn.MultiheadAttention, no layer scale); got " + type(first).__name__)
    act = type(first.mlp.gelu).__name__
    if act not in ("GELU", "QuickGELU"):
        raise TypeError(f"open_clip text activation {act} has no CLIPTextModel equivalent (GELU or QuickGELU)")
    width = tower.positional_embedding.shape[1]
    projection = tower.text_projection
    proj_dim = (projection.out_features if isinstance(projection, nn.Linear)
                else projection.shape[1] if projection is not None else width)
    config = CLIPTextConfig(
        vocab_size=tower.token_embedding.num_embeddings,
        hidden_size=width,
        intermediate_size=first.mlp.c_fc.out_features,
        num_hidden_layers=layers,
        num_attention_heads=first.attn.num_heads,
        max_position_embeddings=tower.positional_embedding.shape[0],
        hidden_act="gelu" if act == "GELU" else "quick_gelu",
        layer_norm_eps=tower.ln_final.eps,
        projection_dim=proj_dim,
        bos_token_id=CLIP_SOT_ID,
        eos_token_id=CLIP_EOT_ID,
        pad_token_id=0,
    )
    model = CLIPTextModel(config)
    own = model.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in own) else ""
    state = {
        "embeddings.token_embedding.weight": tower.token_embedding.weight,
        "embeddings.position_embedding.weight": tower.positional_embedding,
        "final_layer_norm.weight": tower.ln_final.weight,
        "final_layer_norm.bias": tower.ln_final.bias,
    }
    for i in range(layers):
        block, out = blocks[i], f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            q, k, v = getattr(block.attn, f"in_proj_{kind}").chunk(3, dim=0)
            state.update({f"{out}self_attn.q_proj.{kind}": q, f"{out}self_attn.k_proj.{kind}": k,
                          f"{out}self_attn.v_proj.{kind}": v,
                          f"{out}self_attn.out_proj.{kind}": getattr(block.attn.out_proj, kind),
                          f"{out}layer_norm1.{kind}": getattr(block.ln_1, kind),
                          f"{out}layer_norm2.{kind}": getattr(block.ln_2, kind),
                          f"{out}mlp.fc1.{kind}": getattr(block.mlp.c_fc, kind),
                          f"{out}mlp.fc2.{kind}": getattr(block.mlp.c_proj, kind)})
    state = {prefix + k: v.detach().clone().float() for k, v in state.items()}
    load_state_dict_strict(model, state, source=f"open_clip text tower ({type(open_clip_model).__name__})")
    return model.to(tower.token_embedding.weight.dtype).eval()


# ------------------------------------------------------------------------------------------ embedding injection


def _is_ldm_bert(text_encoder: nn.Module) -> bool:
    return type(text_encoder).__name__ == "LDMBertModel"


def _clip_embeddings_module(text_encoder: nn.Module) -> nn.Module:
    """The ``CLIPTextEmbeddings`` of a ``CLIPTextModel`` (transformers 5: ``.embeddings``; 4: ``.text_model``)."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    embeddings = getattr(inner, "embeddings", None)
    if embeddings is None or not hasattr(embeddings, "token_embedding"):
        raise TypeError(f"{type(text_encoder).__name__} is neither a transformers CLIPTextModel nor an LDMBertModel: "
                        "expected one of those text encoders")
    return embeddings


def token_embeddings(text_encoder: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The token embeddings (B × L × d) of ``input_ids`` in the text encoder's input-embedding table, with gradients
    to the table: the starting point for replacing some positions by learned or per-sample vectors."""
    return text_encoder.get_input_embeddings()(input_ids)


@contextmanager
def injected_token_embeddings(text_encoder: nn.Module, token_embeds: torch.Tensor) -> Iterator[None]:
    """Within the block, a ``CLIPTextModel`` called with ``input_ids`` takes its token embeddings from
    ``token_embeds`` (B × L × d) instead of its table (a forward pre-hook on its embeddings module; the position
    embeddings are still added). Prefer :func:`encode_with_embeddings`."""
    embeddings = _clip_embeddings_module(text_encoder)

    def hook(module, args, kwargs):
        kwargs = dict(kwargs)
        ids = kwargs.pop("input_ids", None)
        if args:  # (input_ids, position_ids, inputs_embeds) given positionally
            ids, rest = args[0], args[1:]
            if rest:
                kwargs["position_ids"] = rest[0]
        if ids is not None and tuple(ids.shape) != tuple(token_embeds.shape[:-1]):
            raise ValueError(f"token_embeds have shape {tuple(token_embeds.shape)}; the text encoder got input_ids "
                             f"of shape {tuple(ids.shape)} (expected token_embeds B × L × d for those ids)")
        kwargs["inputs_embeds"] = token_embeds
        return (), kwargs

    handle = embeddings.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def encode_with_embeddings(text_encoder: nn.Module, input_ids: torch.Tensor,
                           token_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """The text encoder's last hidden states (B × L × d: what a UNet's cross-attention reads) of ``input_ids``,
    with the token embeddings taken from ``token_embeds`` (B × L × d) when given (e.g. :func:`token_embeddings` with
    some positions replaced by learned or per-sample vectors). Gradients flow into ``token_embeds``.

    The one way to do it for both text encoders: ``CLIPTextModel`` (through :func:`injected_token_embeddings`; its
    transformers 5 forward has no ``inputs_embeds``) and ``LDMBertModel`` (its forward's ``inputs_embeds``)."""
    if token_embeds is not None and (token_embeds.dim() != 3 or tuple(token_embeds.shape[:2]) != tuple(
            input_ids.shape)):
        raise ValueError(f"token_embeds have shape {tuple(token_embeds.shape)}; expected B × L × d with B × L = "
                         f"{tuple(input_ids.shape)} (the shape of input_ids)")
    if _is_ldm_bert(text_encoder):
        if token_embeds is None:
            return text_encoder(input_ids=input_ids)[0]
        return text_encoder(inputs_embeds=token_embeds)[0]
    if token_embeds is None:
        return text_encoder(input_ids=input_ids)[0]
    with injected_token_embeddings(text_encoder, token_embeds):
        return text_encoder(input_ids=input_ids)[0]


# -------------------------------------------------------------------------------------------------- concept files


def save_concepts(path: str | os.PathLike, concepts: Mapping[str, torch.Tensor]) -> Path:
    """Write learned token vectors in diffusers' textual-inversion format: a safetensors file of
    ``{token: tensor(n, d)}`` (float32), written atomically. diffusers' ``pipe.load_textual_inversion(path)`` reads a
    file of one concept (a multi-vector token becomes ``token, token_1, …``)."""
    from safetensors.torch import save

    if not concepts:
        raise ValueError(f"save_concepts({path}): no concepts given (expected {{token: tensor(n, d)}})")
    tensors, widths = {}, set()
    for token, value in concepts.items():
        value = torch.as_tensor(value).detach()
        if value.dim() == 1:
            value = value[None]
        if value.dim() != 2 or value.shape[0] < 1:
            raise ValueError(f"save_concepts({path}): concept {token!r} has shape {tuple(value.shape)}; expected "
                             "(n, d) with n ≥ 1")
        widths.add(value.shape[1])
        tensors[str(token)] = value.to(device="cpu", dtype=torch.float32).contiguous()
    if len(widths) > 1:
        raise ValueError(f"save_concepts({path}): concepts of different widths {sorted(widths)}")
    return write_atomic(path, save(tensors))


def load_concepts(path: str | os.PathLike, width: int | None = None) -> dict[str, torch.Tensor]:
    """Read a concept file written by :func:`save_concepts` (or diffusers' textual-inversion training):
    ``{token: tensor(n, d)}``, float32. With ``width`` (the text encoder's embedding size,
    ``text_encoder.get_input_embeddings().embedding_dim``), a file of another width is an error naming the file,
    its width and the expected one."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"concept file {path} does not exist")
    if path.suffix == ".safetensors":
        raw = load_file(str(path))
    else:  # diffusers also writes learned_embeds.bin (torch.save of the same dict)
        raw = load_torch_file(path, "concept file")
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"concept file {path}: expected a non-empty {{token: tensor(n, d)}} mapping")
    concepts = {}
    for token, value in raw.items():
        value = torch.as_tensor(value)
        value = value[None] if value.dim() == 1 else value
        if value.dim() != 2:
            raise ValueError(f"concept file {path}: {token!r} has shape {tuple(value.shape)}; expected (n, d)")
        if width is not None and value.shape[1] != int(width):
            raise ValueError(f"concept file {path} holds vectors of width {value.shape[1]} (token {token!r}); the "
                             f"text encoder expects width {int(width)}: it was learned for another text encoder")
        concepts[str(token)] = value.float()
    return concepts


# ------------------------------------------------------------------------------------------ learned concepts in CLIP


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """The tokens of an n-vector concept as diffusers names them: ``[p, p_1, …, p_{n-1}]``."""
    if num_vectors < 1:
        raise ValueError(f"num_vectors must be at least 1, got {num_vectors}")
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def existing_token_id(tokenizer, word: str) -> int | None:
    """The id of ``word`` when the tokenizer already has it as one token (``"object"`` is ``object</w>`` in CLIP's
    vocabulary, a special token is itself), else ``None``: a placeholder must be a new token, or every prompt that
    uses the word would get the concept instead."""
    vocab = tokenizer.get_vocab()
    for form in (word, f"{word}</w>"):
        if form in vocab:
            return int(vocab[form])
    ids = tokenizer(word, add_special_tokens=False).input_ids
    return int(ids[0]) if len(ids) == 1 else None


def expand_placeholder(prompt: str, placeholder: str, num_vectors: int) -> str:
    """``prompt`` with each mention of ``placeholder`` replaced by its n tokens ``p p_1 … p_{n-1}`` (diffusers'
    ``maybe_convert_prompt``)."""
    if num_vectors == 1:
        return prompt
    return re.sub(re.escape(placeholder) + r"(?!_\d)", " ".join(placeholder_tokens(placeholder, num_vectors)), prompt)


class ConceptTextEncoder:
    """open_clip text features of prompts that name learned concepts (ADP's classifier g on "damaged <c_a>").

    ``concepts``: ``{placeholder: vectors (n × width)}`` as :func:`load_concepts` reads them; each becomes n tokens
    added to a :func:`clip_tokenizer` (ids from 49408 on). The ids of a prompt are embedded from the model's own token
    table, and the added ids from the concept vectors; features are pooled at the end token
    (:func:`encode_text_open_clip`). The model is not changed. A placeholder that is already a token, a concept of
    another width than the model's text tower and a prompt that no longer fits the context once expanded are errors
    naming them."""

    def __init__(self, open_clip_model: nn.Module, concepts: Mapping[str, torch.Tensor] | None = None) -> None:
        self.model = open_clip_model
        tower = _text_tower(open_clip_model)
        self.table = tower.token_embedding
        self.context_length = int(tower.positional_embedding.shape[0])
        self.tokenizer = clip_tokenizer(self.context_length)
        width = self.table.embedding_dim
        self.num_vectors: dict[str, int] = {}
        rows = []
        for placeholder, vectors in (concepts or {}).items():
            vectors = torch.as_tensor(vectors).detach().float()
            if vectors.dim() != 2 or vectors.shape[1] != width:
                raise ValueError(f"concept {placeholder!r} has vectors of shape {tuple(vectors.shape)}; the open_clip "
                                 f"text tower takes n × {width}")
            tokens = placeholder_tokens(placeholder, len(vectors))
            for token in tokens:
                known = existing_token_id(self.tokenizer, token)
                if known is not None:
                    raise ValueError(f"concept placeholder {token!r} is already a token of the CLIP vocabulary (id "
                                     f"{known}): learn the concept under another placeholder")
            self.tokenizer.add_tokens(tokens)
            self.num_vectors[placeholder] = len(vectors)
            rows.append(vectors)
        self.first_added = self.table.num_embeddings
        self.added = torch.cat(rows) if rows else torch.zeros(0, width)

    def expand(self, prompt: str) -> str:
        for placeholder, n in self.num_vectors.items():
            prompt = expand_placeholder(prompt, placeholder, n)
        return prompt

    def input_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids (B × context length) of the expanded prompts."""
        return tokenize(self.tokenizer, [self.expand(p) for p in prompts], max_length=self.context_length)

    def token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.table.weight
        own = input_ids.clamp(max=self.first_added - 1).to(weight.device)
        embeds = torch.nn.functional.embedding(own, weight)
        extra = input_ids >= self.first_added
        if extra.any():
            added = self.added.to(device=weight.device, dtype=weight.dtype)
            embeds = embeds.clone()
            embeds[extra.to(weight.device)] = added[(input_ids[extra] - self.first_added).to(weight.device)]
        return embeds

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features (N × D, float32) of ``prompts``."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"encode takes a non-empty list of prompts, got {prompts!r}")
        ids = self.input_ids(list(prompts))
        device = self.table.weight.device
        return encode_text_open_clip(self.model, ids.to(device), self.token_embeddings(ids),
                                     normalize=True).float()
