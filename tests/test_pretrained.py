"""anomgen.pretrained: where weights are found (local path, $ANOMGEN_PRETRAINED_DIR, HF cache) and strict loading."""

from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from anomgen import pretrained
from anomgen.errors import AnomgenError, PretrainedNotFoundError, UnsafeFileError
from anomgen.pretrained import ENV_DIR, load_state_dict_strict, load_torch_file, load_weights_file, resolve

HOW_TO = ("local path", f"${ENV_DIR}/", "network access")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty HF cache under tmp_path, offline mode, and no way to reach the network.

    huggingface_hub reads HF_HOME / HF_HUB_CACHE into ``huggingface_hub.constants`` at import time and the download
    functions read ``constants.HF_HUB_CACHE`` at call time, so the constant is patched as well as the env vars.
    """
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(ENV_DIR, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    calls = []
    real_snapshot, real_file = huggingface_hub.snapshot_download, huggingface_hub.hf_hub_download

    def guarded(real):
        def wrapper(*args, **kwargs):
            calls.append((real.__name__, args, kwargs))
            if not kwargs.get("local_files_only"):
                pytest.fail(f"{real.__name__} called without local_files_only=True while offline: {args} {kwargs}")
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(huggingface_hub, "snapshot_download", guarded(real_snapshot))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", guarded(real_file))

    def no_network(self, *args, **kwargs):
        pytest.fail(f"network access attempted: connect{args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    return cache, calls


def _fill_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/<file>}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    for name, data in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data)
    return snap


# ------------------------------------------------------------------------------------------------------- resolve


def test_local_file_is_returned_as_is(tmp_path, offline_hub):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x")
    assert resolve(f) == f
    assert resolve(str(f)) == f
    # a filename is only joined to folders
    assert resolve(str(f), filename="other.bin") == f
    assert offline_hub[1] == []  # the hub is not consulted for a local path


def test_local_folder_and_filename_inside(tmp_path, offline_hub):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x")
    assert resolve(folder) == folder
    assert resolve(str(folder), filename="model.safetensors") == folder / "model.safetensors"
    assert offline_hub[1] == []


def test_env_dir_is_searched(tmp_path, offline_hub, monkeypatch):
    root = tmp_path / "pretrained"
    (root / "org" / "model").mkdir(parents=True)
    (root / "org" / "model" / "unet.safetensors").write_bytes(b"x")
    (root / "single.pt").write_bytes(b"x")
    monkeypatch.setenv(ENV_DIR, str(root))
    monkeypatch.chdir(tmp_path)  # "org/model" is not a path relative to the working directory
    assert resolve("org/model") == root / "org" / "model"
    assert resolve("org/model", filename="unet.safetensors") == root / "org" / "model" / "unet.safetensors"
    assert resolve("single.pt") == root / "single.pt"
    assert offline_hub[1] == []


def test_local_path_wins_over_env_dir(tmp_path, offline_hub, monkeypatch):
    root = tmp_path / "pretrained"
    (root / "m").mkdir(parents=True)
    (tmp_path / "cwd" / "m").mkdir(parents=True)
    monkeypatch.setenv(ENV_DIR, str(root))
    monkeypatch.chdir(tmp_path / "cwd")
    assert resolve("m").resolve() == (tmp_path / "cwd" / "m").resolve()


def test_missing_hub_id_offline_names_id_and_the_three_ways(offline_hub, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cache, calls = offline_hub
    with pytest.raises(PretrainedNotFoundError) as info:
        resolve("some-org/not-cached-model")
    msg = str(info.value)
    assert "'some-org/not-cached-model'" in msg
    assert "HF_HUB_OFFLINE=1" in msg
    assert "Hugging Face cache" in msg
    for way in HOW_TO:
        assert way in msg, (way, msg)
    assert f"${ENV_DIR}/some-org/not-cached-model" in msg
    # exactly one lookup, in the cache only (no retry, no download)
    assert [c[0] for c in calls] == ["snapshot_download"]
    assert calls[0][2]["local_files_only"] is True
    # the error is both a project error and a FileNotFoundError
    assert isinstance(info.value, AnomgenError) and isinstance(info.value, FileNotFoundError)


def test_missing_hub_file_offline(offline_hub, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PretrainedNotFoundError, match="some-org/model"):
        resolve("some-org/model", filename="unet/diffusion_pytorch_model.safetensors")
    assert [c[0] for c in offline_hub[1]] == ["hf_hub_download"]


def test_missing_hub_id_mentions_env_dir_looked_at(offline_hub, monkeypatch, tmp_path):
    root = tmp_path / "pretrained"
    root.mkdir()
    monkeypatch.setenv(ENV_DIR, str(root))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PretrainedNotFoundError) as info:
        resolve("org/missing")
    assert str(root / "org" / "missing") in str(info.value)


def test_cached_hub_snapshot_is_found_offline(offline_hub, monkeypatch, tmp_path):
    cache, _ = offline_hub
    monkeypatch.chdir(tmp_path)
    snap = _fill_cache(cache, "org/cached", {"config.json": b"{}", "unet/w.safetensors": b"w"})
    assert Path(resolve("org/cached")) == snap
    assert Path(resolve("org/cached", filename="unet/w.safetensors")) == snap / "unet" / "w.safetensors"


def test_missing_absolute_path_says_the_path_does_not_exist(offline_hub, monkeypatch, tmp_path):
    """A path is that path or nothing: no pretrained folder joined to it, no hub cache, no download."""
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "pretrained"))
    missing = tmp_path / "nowhere" / "weights.pt"
    with pytest.raises(PretrainedNotFoundError) as info:
        resolve(str(missing))
    assert str(info.value) == (f"pretrained weights {str(missing)!r}: the path {missing} does not exist; give the "
                               "path of an existing weights file or folder")
    assert offline_hub[1] == []  # a path is never looked up on the hub


def test_missing_relative_path_and_deep_id_do_not_reach_the_hub(offline_hub, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PretrainedNotFoundError, match=f"the path {tmp_path / 'weights' / 'missing.pt'} does not "):
        resolve("./weights/missing.pt")
    with pytest.raises(PretrainedNotFoundError, match="not found") as info:
        resolve("a/b/c")
    assert "Hugging Face" not in str(info.value) and "network" not in str(info.value)
    assert offline_hub[1] == []


def test_a_missing_weights_file_name_says_where_to_copy_it(offline_hub, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PretrainedNotFoundError) as info:
        resolve("256x256_diffusion_uncond.pt")
    msg = str(info.value)
    assert f"Copy it to ${ENV_DIR}/256x256_diffusion_uncond.pt (or the folder paths.pretrained_dir" in msg
    assert "Hugging Face" not in msg and "network" not in msg and "//" not in msg
    with pretrained.use_pretrained_dir(tmp_path / "weights"):
        with pytest.raises(PretrainedNotFoundError) as info:
            resolve("256x256_diffusion_uncond.pt")
    assert f"Copy it to {tmp_path / 'weights' / '256x256_diffusion_uncond.pt'} (the folder paths.pretrained_dir" in (
        str(info.value))
    assert offline_hub[1] == []


def test_the_run_s_pretrained_dir_is_searched_before_the_variable(offline_hub, monkeypatch, tmp_path):
    """What the entry points set from paths.pretrained_dir: searched by resolve and by the torchvision and
    Inception lookups, in place of $ANOMGEN_PRETRAINED_DIR, only inside the block."""
    monkeypatch.chdir(tmp_path)
    ours, env = tmp_path / "ours", tmp_path / "env"
    for folder in (ours, env):
        folder.mkdir()
        for name in ("single.pt", "vit_b_16-c867db91.pth", pretrained.INCEPTION_WEIGHTS_FILE):
            (folder / name).write_bytes(b"")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(PretrainedNotFoundError, match="single.pt"):
        resolve("single.pt")
    with pretrained.use_pretrained_dir(ours):
        assert pretrained.pretrained_dir() == ours
        assert resolve("single.pt") == ours / "single.pt"
        assert pretrained.torchvision_weights("vit_b_16", "IMAGENET1K_V1") == ours / "vit_b_16-c867db91.pth"
        assert pretrained.inception_weights() == ours / pretrained.INCEPTION_WEIGHTS_FILE
        monkeypatch.setenv(ENV_DIR, str(env))  # the config's folder (whose default is the variable) wins
        assert resolve("single.pt") == ours / "single.pt"
        with pretrained.use_pretrained_dir(None):  # None changes nothing
            assert pretrained.pretrained_dir() == ours
    assert pretrained.pretrained_dir() == env and resolve("single.pt") == env / "single.pt"
    monkeypatch.delenv(ENV_DIR)
    assert pretrained.pretrained_dir() is None


def test_online_download_failure_is_wrapped(monkeypatch, tmp_path):
    """Not offline: a failed download is one PretrainedNotFoundError naming the id and the cause."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(ENV_DIR, raising=False)
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def fake_snapshot(repo_id, revision=None, local_files_only=False, **kw):
        calls.append((repo_id, revision, local_files_only))
        if local_files_only:
            raise LocalEntryNotFoundError("not in cache")
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    with pytest.raises(PretrainedNotFoundError) as info:
        resolve("org/model", revision="v1")
    msg = str(info.value)
    assert "'org/model'" in msg and "ConnectionError" in msg and "no route to host" in msg
    assert isinstance(info.value.__cause__, ConnectionError)
    assert calls == [("org/model", "v1", True), ("org/model", "v1", False)]


def test_online_download_success(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(ENV_DIR, raising=False)
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fake_file(repo_id, filename, revision=None, local_files_only=False, **kw):
        if local_files_only:
            raise LocalEntryNotFoundError("not in cache")
        return str(tmp_path / "dl" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    assert resolve("org/model", filename="w.bin") == tmp_path / "dl" / "w.bin"


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_hub_offline_flag(monkeypatch, value, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert pretrained.hub_offline() is expected


# -------------------------------------------------------------------------------------------------- strict loading


class Tiny(nn.Module):
    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.lin = nn.Linear(width, 2)
        self.norm = nn.BatchNorm1d(2)


def _random_state(module: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in module.state_dict().items():
        out[k] = torch.randn(v.shape, generator=gen).to(v.dtype) if v.is_floating_point() else v.clone() + 7
    return out


def test_matching_state_dict_loads_values():
    model = Tiny()
    state = _random_state(model)
    load_state_dict_strict(model, state, source="test")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_meta_module_takes_the_checkpoint_tensors_cast_to_its_dtypes():
    with torch.device("meta"):
        model = Tiny()
    state = {k: v.double() if v.is_floating_point() else v for k, v in _random_state(Tiny()).items()}
    load_state_dict_strict(model, state, source="test", assign=True)
    for k, v in model.state_dict().items():
        assert not v.is_meta and v.dtype == Tiny().state_dict()[k].dtype, k
        assert torch.equal(v, state[k].to(v.dtype)), k
    assert all(p.requires_grad for p in model.parameters())


def test_meta_module_with_a_tensor_the_checkpoint_cannot_fill_is_an_error():
    with torch.device("meta"):
        model = Tiny()
        model.register_buffer("cache", torch.zeros(2), persistent=False)  # not in any state dict
    with pytest.raises(RuntimeError, match="ckpt.pt leave Tiny tensors without values: cache"):
        load_state_dict_strict(model, _random_state(Tiny()), source="ckpt.pt", assign=True)


def test_missing_key_is_an_error_naming_it():
    model = Tiny()
    state = _random_state(model)
    del state["lin.bias"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError) as info:
        load_state_dict_strict(model, state, source="ckpt.pt")
    msg = str(info.value)
    assert "missing keys: lin.bias" in msg and "ckpt.pt" in msg and "Tiny" in msg
    assert "unexpected" not in msg
    # nothing was loaded
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_unexpected_key_is_an_error_naming_it():
    model = Tiny()
    state = _random_state(model)
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"unexpected keys: head\.weight"):
        load_state_dict_strict(model, state, source="x")


def test_shape_mismatch_is_an_error_naming_key_and_shapes():
    model = Tiny(width=3)
    state = _random_state(Tiny(width=5))
    with pytest.raises(RuntimeError) as info:
        load_state_dict_strict(model, state, source="x")
    msg = str(info.value)
    assert "shape mismatches: lin.weight: weights (2, 5) vs model (2, 3)" in msg
    assert "missing" not in msg and "unexpected" not in msg


def test_many_missing_keys_are_summarised():
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(8)])  # 16 keys
    with pytest.raises(RuntimeError, match=r"\(16 in all\)"):
        load_state_dict_strict(model, {}, source="empty")


# ------------------------------------------------------------------------------------------------- weight files


def test_load_safetensors(tmp_path):
    state = _random_state(Tiny())
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    loaded = load_weights_file(path)
    assert set(loaded) == set(state)
    for k in state:
        assert torch.equal(loaded[k], state[k])


@pytest.mark.parametrize("wrapped", [False, True])
def test_load_torch_checkpoint(tmp_path, wrapped):
    state = _random_state(Tiny(), seed=3)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": state, "epoch": 3} if wrapped else state, path)
    loaded = load_weights_file(str(path))
    assert isinstance(loaded, dict) and set(loaded) == set(state)
    for k in state:
        assert torch.equal(loaded[k], state[k])
    model = Tiny()
    load_state_dict_strict(model, loaded, source=str(path))
    assert torch.equal(model.lin.weight, state["lin.weight"])


def test_torch_checkpoint_with_code_is_refused(tmp_path, code_running_file):
    path = tmp_path / "evil.pt"
    torch.save({"obj": Tiny()}, path)  # a pickled module needs arbitrary globals
    with pytest.raises(UnsafeFileError, match="weights file .*evil.pt was refused"):
        load_weights_file(path)
    marker = code_running_file(tmp_path / "runs_code.pt", lambda code: {"lin.weight": torch.zeros(1), "x": code})
    with pytest.raises(UnsafeFileError, match=r"runs_code.pt was refused: .*mkdir.*never unpickled in full"):
        load_weights_file(tmp_path / "runs_code.pt")
    assert not marker.exists(), "the file's code must not run"
    (tmp_path / "junk.pt").write_bytes(b"no torch file at all")
    with pytest.raises(UnsafeFileError, match="junk.pt was refused"):
        load_torch_file(tmp_path / "junk.pt")


# -------------------------------------------------------------------------- torchvision, Inception, open_clip files


@pytest.fixture
def no_local_files(tmp_path, monkeypatch):
    """An empty torch hub cache, no $ANOMGEN_PRETRAINED_DIR, offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(ENV_DIR, raising=False)
    return tmp_path


def test_torchvision_weights_are_found_by_file_name_or_named_with_how_to_supply(no_local_files, monkeypatch):
    tmp_path = no_local_files
    with pytest.raises(PretrainedNotFoundError, match="ViT_B_16_Weights.IMAGENET1K_V1") as err:
        pretrained.torchvision_weights("vit_b_16", "IMAGENET1K_V1")
    assert "vit_b_16-c867db91.pth" in str(err.value) and "HF_HUB_OFFLINE=1" in str(err.value)
    assert f"${ENV_DIR}/" in str(err.value) and "`pretrained`" in str(err.value)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "vit_b_16-c867db91.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert pretrained.torchvision_weights("vit_b_16", "IMAGENET1K_V1") == cached
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "dir"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "vit_b_16-c867db91.pth").write_bytes(b"")
    assert pretrained.torchvision_weights("vit_b_16", "IMAGENET1K_V1") == tmp_path / "dir" / "vit_b_16-c867db91.pth"
    assert pretrained.torchvision_weights("vit_b_16", cached) == cached  # a file is itself
    with pytest.raises(ValueError, match="neither a file nor a torchvision weights name.*IMAGENET1K_SWAG_E2E_V1"):
        pretrained.torchvision_weights("vit_b_16", "IMAGENET9K")


def test_backbone_weights_say_how_to_make_a_missing_backbone(no_local_files):
    with pytest.raises(PretrainedNotFoundError, match="model=backbone_pretrain .*datamodule.dataset=digits"):
        pretrained.backbone_weights("vit_small", str(no_local_files / "vit_small_digits.pt"))
    with pytest.raises(PretrainedNotFoundError, match="ViT_B_16_Weights"):
        pretrained.backbone_weights("vit_b_16", "IMAGENET1K_V1")  # a torchvision name goes to torchvision_weights


def test_inception_weights_looks_in_the_pretrained_dir_and_the_torch_hub_cache(no_local_files, monkeypatch):
    file = pretrained.INCEPTION_WEIGHTS_FILE
    with pytest.raises(PretrainedNotFoundError, match="unavailable offline") as err:
        pretrained.inception_weights()
    assert file in str(err.value) and pretrained.INCEPTION_WEIGHTS_URL in str(err.value)
    hub = no_local_files / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / file).write_bytes(b"")
    assert pretrained.inception_weights() == hub / file
    own = no_local_files / "pretrained"
    own.mkdir()
    (own / file).write_bytes(b"")
    monkeypatch.setenv(ENV_DIR, str(own))
    assert pretrained.inception_weights() == own / file
    assert pretrained.inception_weights(own) == own / file


def test_open_clip_weights(offline_hub, tmp_path):
    weights = tmp_path / "clip.bin"
    weights.write_bytes(b"")
    assert pretrained.open_clip_weights("ViT-B-16", weights) == weights  # a file is itself
    with pytest.raises(ValueError, match="no pretrained tag 'no-such-tag'.*openai"):
        pretrained.open_clip_weights("ViT-B-16", "no-such-tag")
    with pytest.raises(PretrainedNotFoundError, match="timm/ViT-B-16-SigLIP"):
        pretrained.open_clip_weights("ViT-B-16-SigLIP", "webli")
