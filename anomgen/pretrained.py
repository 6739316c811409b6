"""The one place where pretrained weights are found.

A model id is resolved, in this order, to:

1. a local path (file or folder) given as the id itself; an explicit path (absolute, ``~/...``, ``./...``) that does
   not exist is an error at once;
2. ``<pretrained dir>/<id>``, the folder of weights you copied in by hand (:func:`pretrained_dir`: a run's
   ``paths.pretrained_dir``, whose default is ``$ANOMGEN_PRETRAINED_DIR`` or ``<root>/pretrained``; outside a run,
   ``$ANOMGEN_PRETRAINED_DIR``);
3. the local Hugging Face cache (``huggingface_hub``; nothing is downloaded with ``HF_HUB_OFFLINE=1``);
4. a download from the hub, only when not offline. A file name (``*.pt``, ``*.safetensors`` ...) or a path of more
   than two parts is never looked up on the hub.

When none of these has it, :class:`~anomgen.errors.PretrainedNotFoundError` names the id, where it looked and how to
supply it, at once (no retries). Weights load strictly: :func:`load_state_dict_strict` refuses missing or unexpected
keys instead of warning about them. Torch files are read by :func:`load_torch_file` only, never unpickled in full.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch

from anomgen.errors import PretrainedNotFoundError, UnsafeFileError

ENV_DIR = "ANOMGEN_PRETRAINED_DIR"
#: ids that name a weights file (e.g. 256x256_diffusion_uncond.pt) are never looked up on the hub
FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def plain_entry(entry: Mapping | None) -> dict:
    """A ``pretrained.*`` config entry as plain Python containers (Hydra passes DictConfigs; open_clip and diffusers
    want dicts)."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf ships with hydra
        DictConfig = ()
    if entry is None:
        return {}
    if DictConfig and isinstance(entry, DictConfig):
        return OmegaConf.to_container(entry, resolve=True)
    return dict(entry)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


#: the run config's ``paths.pretrained_dir`` while a run uses it (:func:`use_pretrained_dir`)
_run_dir: Path | None = None


def pretrained_dir() -> Path | None:
    """The folder of weights copied in by hand: the running config's ``paths.pretrained_dir`` (set by the entry points
    through :func:`use_pretrained_dir`), else ``$ANOMGEN_PRETRAINED_DIR``, else None."""
    if _run_dir is not None:
        return _run_dir
    root = os.environ.get(ENV_DIR)
    return Path(root).expanduser() if root else None


@contextmanager
def use_pretrained_dir(folder: str | os.PathLike | None) -> Iterator[None]:
    """Inside the block, :func:`pretrained_dir` is ``folder`` (a run's ``paths.pretrained_dir``; None: unchanged)."""
    global _run_dir
    before = _run_dir
    if folder is not None:
        _run_dir = Path(str(folder)).expanduser()
    try:
        yield
    finally:
        _run_dir = before


def in_pretrained_dir(name: str) -> str:
    """Where to copy the weights ``name`` by hand, for error messages."""
    root = pretrained_dir()
    if root is None:
        return f"${ENV_DIR}/{name} (or the folder paths.pretrained_dir of a run's config)"
    return f"{root / name} (the folder paths.pretrained_dir, by default ${ENV_DIR})"


def _is_explicit_path(model_id: str) -> bool:
    """An id written as a path (absolute, ``~/...``, ``./...``, ``../...``): it is that path or nothing."""
    return model_id.startswith(("/", "~", "./", "../")) or model_id in (".", "..") or Path(model_id).is_absolute()


def _how_to_supply(model_id: str) -> str:
    return (
        f"Supply it by one of: (a) giving a local path instead of the id (a folder saved with save_pretrained, "
        f"or a weights file); (b) copying it to {in_pretrained_dir(model_id)}; (c) running once with network access "
        f"(HF_HUB_OFFLINE unset) to fill the Hugging Face cache."
    )


def resolve(model_id: str | os.PathLike, filename: str | None = None, revision: str | None = None,
            allow_patterns: list[str] | None = None) -> Path:
    """Return a local path for ``model_id`` (a folder, or the file ``filename`` inside the repo).

    ``allow_patterns`` (glob patterns of repo files, for a folder) limits what a hub download fetches, e.g. the
    configs and safetensors weights of a diffusers repo without its single-file checkpoints."""
    model_id = str(model_id)
    looked: list[str] = []
    local = Path(model_id).expanduser()
    if local.exists():
        return local / filename if filename and local.is_dir() else local
    if _is_explicit_path(model_id):
        raise PretrainedNotFoundError(f"pretrained weights {model_id!r}: the path {local.absolute()} does not exist; "
                                      "give the path of an existing weights file or folder")
    looked.append(f"local path {local.absolute()}")
    root = pretrained_dir()
    if root is not None:
        candidate = root / model_id
        if candidate.exists():
            return candidate / filename if filename and candidate.is_dir() else candidate
        looked.append(f"{candidate}")
    if model_id.count("/") > 1 or Path(model_id).suffix in FILE_SUFFIXES:  # a file or a path, not a hub id
        raise PretrainedNotFoundError(f"pretrained weights {model_id!r} not found (looked at: {'; '.join(looked)}). "
                                      f"Copy it to {in_pretrained_dir(model_id)} or give its path.")
    try:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub ships with diffusers / transformers
        raise PretrainedNotFoundError(f"pretrained weights {model_id!r}: huggingface_hub is not installed. "
                                      + _how_to_supply(model_id)) from None
    download = (
        (lambda **kw: huggingface_hub.hf_hub_download(model_id, filename, revision=revision, **kw))
        if filename
        else (lambda **kw: huggingface_hub.snapshot_download(model_id, revision=revision,
                                                             allow_patterns=allow_patterns, **kw))
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


def load_torch_file(path: str | os.PathLike, what: str = "torch file"):
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only. A file that needs any
    other class (a pickled object whose unpickling could run code) or is no torch file is an
    :class:`~anomgen.errors.UnsafeFileError` naming ``what`` and the file; nothing in it is run. Every torch file the
    project reads (weights, backbones, localizers, concepts, feature caches) comes through here."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        skip = ("Weights only load failed", "Check the documentation", "Please file an issue")
        reason = " ".join(line.strip() for line in str(err).splitlines()
                          if line.strip() and not line.strip().startswith(skip))
        raise UnsafeFileError(
            f"{what} {path} was refused: it holds more than tensors and plain containers ({reason or err}). Torch "
            "files are read with torch.load(weights_only=True) and never unpickled in full, since unpickling runs "
            "code; save weights as a state dict (torch.save(module.state_dict(), path)) or as .safetensors"
        ) from None


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or torch checkpoint file as a flat state dict (tensors only)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = load_torch_file(path, "weights file")
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    return dict(obj)


# ----------------------------------------------------------------------------------------------- torchvision weights


def torchvision_weights_entry(arch: str, name: str):
    """The torchvision weights enum member ``name`` of ``arch`` (``"vit_b_16"``), or None when ``name`` is not one."""
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    if name == "DEFAULT":
        return enum.DEFAULT
    return enum.__members__.get(name)


def torchvision_weights_names(arch: str) -> list[str]:
    """The torchvision weights names of ``arch``, ``"DEFAULT"`` first."""
    from torchvision.models import get_model_weights

    return ["DEFAULT", *get_model_weights(arch).__members__]


def torchvision_weights(arch: str, pretrained: str | os.PathLike) -> Path:
    """The local file of ``pretrained``: a path to a weights file, or torchvision weights ``<arch>`` / ``pretrained``
    (e.g. ``vit_b_16`` / ``IMAGENET1K_V1``).

    A weights name is looked for, by the file name in the weights' URL, in the pretrained folder
    (:func:`pretrained_dir`) and in the torch hub cache ``torch.hub.get_dir()/checkpoints/<file>`` (where
    ``torchvision.models.vit_b_16(weights=...)`` puts it). When absent and not offline (``HF_HUB_OFFLINE`` unset) it
    is downloaded into the hub cache; otherwise, or when the download fails, :class:`PretrainedNotFoundError` names
    the weights, the file and how to supply it.
    Neither a file nor a weights name of ``arch`` is a :class:`ValueError` that lists the names.
    """
    file = Path(pretrained).expanduser()
    if file.is_file():
        return file
    name = str(pretrained)
    weights = torchvision_weights_entry(arch, name)
    if weights is None:
        raise ValueError(f"{arch}: pretrained {name!r} is neither a file nor a torchvision weights name; its weights: "
                         f"{', '.join(torchvision_weights_names(arch))}")
    filename = os.path.basename(weights.url)
    cache = Path(torch.hub.get_dir()) / "checkpoints" / filename
    root = pretrained_dir()
    candidates = ([root / filename] if root is not None else []) + [cache]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    enum_name = f"{type(weights).__name__}.{weights.name}"
    how = (f"Supply it by one of: (a) downloading {weights.url} to {cache} (the torch hub cache; TORCH_HOME moves "
           f"it); (b) copying it to {in_pretrained_dir(filename)}; (c) giving the file's path as `pretrained`; "
           f"(d) running once with network access (HF_HUB_OFFLINE unset), e.g. "
           f"torchvision.models.{arch}(weights={weights.name!r}).")
    looked = "; ".join(str(c) for c in candidates)
    if hub_offline():
        raise PretrainedNotFoundError(f"torchvision weights {enum_name} ({filename}) not found (looked at: {looked}) "
                                      f"and HF_HUB_OFFLINE=1 forbids downloading. {how}")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(cache), progress=True)
    except Exception as err:  # network errors come in many kinds
        raise PretrainedNotFoundError(f"torchvision weights {enum_name} ({filename}) not found (looked at: {looked}) "
                                      f"and could not be downloaded ({type(err).__name__}: {err}). {how}") from err
    return cache


def backbone_weights(arch: str, pretrained: str | os.PathLike) -> Path:
    """The local file of a ViT backbone's weights: a path or id for :func:`resolve` (a backbone file, a state dict),
    or, for ``vit_b_16``, a torchvision weights name (:func:`torchvision_weights`).

    A missing backbone file is a :class:`PretrainedNotFoundError` that also says how to make one by pretraining."""
    pretrained = str(pretrained)
    named = arch == "vit_b_16" and torchvision_weights_entry(arch, pretrained) is not None
    if Path(pretrained).expanduser().exists() or not named:
        try:
            return resolve(pretrained)
        except PretrainedNotFoundError as err:
            path = Path(pretrained)
            folder = path.parent if path.name == "backbone.pt" else path.with_suffix("")
            dataset = next((d for d in ("animal_mnist", "digits") if d in str(folder.name)), "<digits|animal_mnist>")
            raise PretrainedNotFoundError(
                f"{err} A backbone file is made by pretraining on data disjoint from the task (Animal-MNIST for "
                f"digit tasks, digits for Animal-MNIST tasks), as the FITYMI pipelines' backbone stage does: `python "
                f"train.py model=backbone_pretrain datamodule=classification datamodule.dataset={dataset} "
                f"trainer.max_epochs=30 callbacks=none hydra.run.dir={folder}` writes {folder}/backbone.pt") from None
    return torchvision_weights(arch, pretrained)


# ------------------------------------------------------------------------------------------- FID Inception-v3 weights

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE


def _inception_candidates() -> list[Path]:
    places = []
    root = pretrained_dir()
    if root is not None:
        places += [root / INCEPTION_WEIGHTS_FILE, root / "inception-v3-fid" / INCEPTION_WEIGHTS_FILE]
    places.append(Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE)
    return places


def inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The local file of torch-fidelity's FID Inception-v3 weights; never downloads.

    ``path`` (a file, or a folder holding ``weights-inception-2015-12-05-6726825d.pth``) is used alone when given.
    Otherwise the file is looked for in the pretrained folder (:func:`pretrained_dir`; also its ``inception-v3-fid/``
    sub-folder) and in torch's hub cache (``$TORCH_HOME/hub/checkpoints/``, where torch-fidelity's own download puts
    it).
    Raises :class:`~anomgen.errors.PretrainedNotFoundError` saying how to supply the weights or another extractor.
    """
    if path is not None:
        p = Path(path).expanduser()
        candidates = [p / INCEPTION_WEIGHTS_FILE] if p.is_dir() else [p]
    else:
        candidates = _inception_candidates()
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise PretrainedNotFoundError(
        "Inception weights for FID/KID/IS are unavailable offline: no "
        f"{INCEPTION_WEIGHTS_FILE} at {', '.join(str(c) for c in candidates)} (nothing is downloaded). Either supply "
        f"the file (torch-fidelity's Inception-v3, {INCEPTION_WEIGHTS_URL}) by copying it to "
        f"{in_pretrained_dir(INCEPTION_WEIGHTS_FILE)} or "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}/ or passing its path as "
        "`anomgen.encoders.InceptionFeatures(weights=...)`, or give FID/KID another feature extractor: "
        "`FID(feature_extractor=anomgen.encoders.RawPixels())` for small images (8×8 digits, 28×28 silhouettes), or "
        "any nn.Module mapping [0, 1] images B×3×H×W to features B×D (e.g. anomgen.encoders.OpenCLIPImageEncoder); "
        "for the Inception Score, `InceptionScore(classifier=...)` with any nn.Module giving class logits B×C."
    )


# ------------------------------------------------------------------------------------------------- open_clip weights

OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def open_clip_weights(model_name: str, pretrained: str | os.PathLike) -> Path:
    """The local weights file of open_clip model ``model_name``: ``pretrained`` itself when it is a file, else the file
    of open_clip tag ``pretrained`` (``"webli"``, ``"openai"``, ...), whose Hugging Face repo is found by
    :func:`resolve` (offline-safe). A tag published only by URL, an unknown tag, or a repo without a weights file is an
    error that names the model, the tag and what to do."""
    file = Path(pretrained).expanduser()
    if file.is_file():
        return file
    import open_clip

    tag = str(pretrained)
    cfg = open_clip.get_pretrained_cfg(model_name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ValueError(f"open_clip model {model_name!r} has no pretrained tag {tag!r} (and it is not a "
                         f"file); its tags: {', '.join(tags) or 'none'}")
    hub = (cfg.get("hf_hub") or "").strip("/")
    if not hub:
        raise PretrainedNotFoundError(f"{model_name}/{tag} is published only at {cfg.get('url')}; "
                                      "download it and pass the file's path as `pretrained`")
    folder = resolve(hub)
    for name in OPEN_CLIP_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise PretrainedNotFoundError(f"{hub}: none of {OPEN_CLIP_WEIGHT_FILES} in {folder}. " + _how_to_supply(hub))
