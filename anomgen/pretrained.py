"""The one place where pretrained weights are found.

A model id is resolved, in this order, to:

1. a local path (file or folder) given as the id itself;
2. ``$ANOMGEN_PRETRAINED_DIR/<id>`` (a folder of weights you copied in by hand);
3. the local Hugging Face cache (``huggingface_hub``; nothing is downloaded with ``HF_HUB_OFFLINE=1``);
4. a download from the hub, only when not offline.

When none of these has it, :class:`~anomgen.errors.PretrainedNotFoundError` names the id, where it looked and how to
supply it, at once (no retries). Weights load strictly: :func:`load_state_dict_strict` refuses missing or unexpected
keys instead of warning about them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from anomgen.errors import PretrainedNotFoundError

ENV_DIR = "ANOMGEN_PRETRAINED_DIR"
#: ids that name a weights file (e.g. 256x256_diffusion_uncond.pt) are never looked up on the hub
FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _how_to_supply(model_id: str) -> str:
    return (
        f"Supply it by one of: (a) giving a local path instead of the id (a folder saved with save_pretrained, "
        f"or a weights file); (b) copying it to ${ENV_DIR}/{model_id}; (c) running once with network access "
        f"(HF_HUB_OFFLINE unset) to fill the Hugging Face cache."
    )


def resolve(model_id: str | os.PathLike, filename: str | None = None, revision: str | None = None) -> Path:
    """Return a local path for ``model_id`` (a folder, or the file ``filename`` inside the repo)."""
    model_id = str(model_id)
    looked: list[str] = []
    local = Path(model_id).expanduser()
    if local.exists():
        return local / filename if filename and local.is_dir() else local
    looked.append(f"local path {local}")
    root = os.environ.get(ENV_DIR)
    if root:
        candidate = Path(root) / model_id
        if candidate.exists():
            return candidate / filename if filename and candidate.is_dir() else candidate
        looked.append(f"{candidate}")
    if model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1 or Path(model_id).suffix in FILE_SUFFIXES:
        raise PretrainedNotFoundError(f"pretrained weights {model_id!r} not found (looked at: {'; '.join(looked)}). "
                                      + _how_to_supply(model_id))
    try:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers / transformers
        raise PretrainedNotFoundError(f"pretrained weights {model_id!r}: huggingface_hub is not installed. "
                                      + _how_to_supply(model_id)) from None
    download = (
        (lambda **kw: huggingface_hub.hf_hub_download(model_id, filename, revision=revision, **kw))
        if filename
        else (lambda **kw: huggingface_hub.snapshot_download(model_id, revision=revision, **kw))
    )
    try:
        return Path(download(local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        looked.append("the Hugging Face cache")
    if hub_offline():
        raise PretrainedNotFoundError(
            f"pretrained weights {model_id!r} not found (looked at: {'; '.join(looked)}) and HF_HUB_OFFLINE=1 "
            "forbids downloading. " + _how_to_supply(model_id)
        )
    try:
        return Path(download())
    except Exception as err:  # the hub raises many kinds: not found, gated, network
        raise PretrainedNotFoundError(
            f"pretrained weights {model_id!r} could not be downloaded ({type(err).__name__}: {err}). "
            + _how_to_supply(model_id)
        ) from err


def load_state_dict_strict(module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str,
                           assign: bool = False) -> None:
    """Load ``state_dict`` into ``module``; any missing or unexpected key (or shape mismatch) is an error.

    ``assign=True`` for a module built on the meta device (no memory, no random init): its tensors become the
    checkpoint's, cast to the module's dtypes, and a tensor the checkpoint does not fill (a non-persistent buffer)
    is an error."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        f"{k}: weights {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(own[k].shape) != tuple(state_dict[k].shape)
    )
    if missing or unexpected or mismatched:

        def show(keys):
            return ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "")

        parts = [f"weights from {source} do not fit {type(module).__name__}"]
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {show(mismatched)}")
        raise RuntimeError("; ".join(parts))
    if not assign:
        module.load_state_dict(state_dict, strict=True)
        return
    module.load_state_dict({k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state_dict.items()},
                           strict=True, assign=True)
    left = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"weights from {source} leave {type(module).__name__} tensors without values: "
                           f"{', '.join(left[:10])}")


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch checkpoint file as a flat state dict (tensors only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    return dict(obj)
