"""The text-to-image stack: loading diffusers folders (SD and LDM) strictly and offline-safely, the tiny stacks, and
the training step (latents, ε / v targets, masked loss) against computations written out independently."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from anomgen.diffusion.text2image import (
    LatentCache,
    autocast_context,
    build_text_to_image,
    configure_memory,
    decode_latents,
    diffusion_loss,
    encode_latents,
    load_text_to_image,
    random_sd21_stack,
    read_model_index,
    sd21_architecture,
    tiny_text_to_image,
    to_pipeline,
)
from anomgen.errors import PretrainedNotFoundError

PROMPTS = ["a photo of a flawless object", "a photo of a damaged object"]


@pytest.fixture(scope="module")
def sd():
    return tiny_text_to_image("sd", prediction_type="epsilon")


@pytest.fixture(scope="module")
def sd_v():
    return tiny_text_to_image("sd", prediction_type="v_prediction", seed=1)


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_missing_hub_model_fails_at_once_naming_it(monkeypatch):
    import diffusers  # noqa: F401  (imports are not what is timed)
    import huggingface_hub  # noqa: F401

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(PretrainedNotFoundError, match="stabilityai/stable-diffusion-2-1"):
        load_text_to_image("stabilityai/stable-diffusion-2-1", prediction_type="v_prediction")
    with pytest.raises(PretrainedNotFoundError, match="CompVis/ldm-text2im-large-256"):
        build_text_to_image(source="CompVis/ldm-text2im-large-256")
    assert time.perf_counter() - start < 3  # no retries (46 s without HF_HUB_OFFLINE)


def test_tiny_sd_stack_shares_the_token_table_and_is_seeded(sd):
    assert sd.kind == "sd" and sd.prediction_type == "epsilon" and sd.latent_factor == 2 and sd.resolution == 32
    assert sd.scaling_factor == pytest.approx(0.18215) and sd.text_width == 32
    assert torch.equal(sd.text_encoder.get_input_embeddings().weight, sd.open_clip_model.token_embedding.weight)
    assert not any(p.requires_grad for m in sd.modules().values() for p in m.parameters())
    before = torch.random.get_rng_state()
    again = tiny_text_to_image("sd", prediction_type="epsilon")
    assert torch.equal(torch.random.get_rng_state(), before)  # the global random state is left alone
    assert all(_state_equal(getattr(sd, n), getattr(again, n)) for n in ("unet", "vae", "text_encoder"))
    # it is a working SD pipeline: diffusers' own loop runs on it
    images = to_pipeline(sd)(PROMPTS[0], num_inference_steps=2, output_type="pt",
                             generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("kind", ["sd", "ldm"])
def test_a_saved_diffusers_folder_loads_back_strictly(kind, sd_v, tmp_path):
    stack = sd_v if kind == "sd" else tiny_text_to_image("ldm", prediction_type="v_prediction")
    folder = tmp_path / kind
    to_pipeline(stack, scheduler=stack.noise_scheduler).save_pretrained(folder)
    assert read_model_index(folder)["_class_name"] == ("StableDiffusionPipeline" if kind == "sd"
                                                       else "LDMTextToImagePipeline")
    loaded = load_text_to_image(folder)
    assert (loaded.kind, loaded.prediction_type, loaded.latent_factor, loaded.resolution) == (kind, "v_prediction",
                                                                                            2, 32)
    assert loaded.scaling_factor == pytest.approx(stack.scaling_factor) and loaded.source == str(folder)
    assert type(loaded.text_encoder).__name__ == ("CLIPTextModel" if kind == "sd" else "LDMBertModel")
    for name in ("unet", "vae", "text_encoder"):
        assert _state_equal(getattr(loaded, name), getattr(stack, name)), name
    if kind == "sd":  # hub checkpoints written by transformers 4 name the keys text_model.* and keep position_ids
        from safetensors.torch import load_file, save_file

        weights = folder / "text_encoder" / "model.safetensors"
        old = {f"text_model.{k}": v for k, v in load_file(weights).items()}
        save_file({**old, "text_model.embeddings.position_ids": torch.arange(77)[None]}, weights)
        assert _state_equal(load_text_to_image(folder).text_encoder, stack.text_encoder)
    with torch.no_grad():
        assert torch.equal(loaded.tokenize(PROMPTS), stack.tokenize(PROMPTS))
        assert torch.allclose(loaded.encode_prompts(PROMPTS), stack.encode_prompts(PROMPTS), atol=1e-6)
    # the stated prediction type must agree with the scheduler config
    with pytest.raises(ValueError, match="prediction_type='epsilon'.*says 'v_prediction'"):
        load_text_to_image(folder, prediction_type="epsilon")
    assert build_text_to_image(source=folder, prediction_type="v_prediction").kind == kind


def test_loading_refuses_missing_parts_and_unfitting_weights(sd, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "sd"
    to_pipeline(sd, scheduler=sd.noise_scheduler).save_pretrained(folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["extra.weight"] = torch.zeros(1)
    save_file(state, weights)
    with pytest.raises(RuntimeError, match="unexpected_keys: extra.weight"):
        load_text_to_image(folder)
    shutil.rmtree(folder / "vae")
    with pytest.raises(PretrainedNotFoundError, match="no vae/"):
        load_text_to_image(folder)


def test_encode_latents_and_the_latent_cache(sd):
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        dist = sd.vae.encode(images * 2 - 1).latent_dist
        expected = dist.sample(generator=torch.Generator().manual_seed(5)) * 0.18215
        latents = encode_latents(sd, images, generator=torch.Generator().manual_seed(5))
        assert latents.shape == (3, 4, 16, 16) and torch.allclose(latents, expected, atol=1e-6)
        assert torch.allclose(encode_latents(sd, images, sample=False), dist.mean * 0.18215, atol=1e-6)
        assert decode_latents(sd, latents).shape == (3, 3, 32, 32)
        cache = LatentCache(sd, images, batch_size=2)
        for seed in range(3):
            drawn = cache.sample([0, 2], generator=torch.Generator().manual_seed(seed))
            direct = encode_latents(sd, images[[0, 2]], generator=torch.Generator().manual_seed(seed))
            assert torch.allclose(drawn, direct, atol=1e-5)
        assert torch.allclose(cache.mean(), dist.mean * 0.18215, atol=1e-5)
    assert cache.encodings == 1  # encoded once, whatever the number of draws
    with pytest.raises(ValueError, match="not a multiple of the latent factor 2"):
        encode_latents(sd, torch.rand(1, 3, 31, 32))


def _written_out_loss(stack, latents, hidden, noise, t, target: str, mask=None):
    """x_t and the target from ᾱ_t by hand; the UNet's prediction; the squared error's (masked) mean."""
    abar = stack.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    with torch.no_grad():
        prediction = stack.unet(noisy, t, hidden).sample
    goal = noise if target == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    error = (prediction - goal) ** 2
    if mask is None:
        return error.mean()
    return (error * mask).sum() / (mask.sum() * error.shape[1])


@pytest.mark.parametrize("target", ["epsilon", "v_prediction"])
def test_diffusion_loss_equals_the_written_out_step(target, sd, sd_v):
    stack = sd if target == "epsilon" else sd_v
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        hidden = stack.encode_prompts(PROMPTS)
        noise, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
        loss = diffusion_loss(stack, latents, hidden, noise=noise, timesteps=t)
        assert torch.allclose(loss, _written_out_loss(stack, latents, hidden, noise, t, target), atol=1e-6)
        # drawn from the generator: the noise first, then the timesteps
        g = torch.Generator().manual_seed(7)
        noise, t = torch.randn(2, 4, 16, 16, generator=g), torch.randint(0, 1000, (2,), generator=g)
        loss = diffusion_loss(stack, latents, hidden, generator=torch.Generator().manual_seed(7))
        assert torch.allclose(loss, _written_out_loss(stack, latents, hidden, noise, t, target), atol=1e-6)


def test_masked_loss_is_the_mean_over_the_masked_latent_area(sd):
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 16, 16)
    noise, t = torch.randn(2, 4, 16, 16), torch.tensor([100, 500])
    mask = torch.zeros(2, 32, 32)
    mask[0, 4:12, 8:20] = 1  # aligned to the 2×2 cells: the latent mask is [2:6, 4:10]
    mask[1, 20:32, 0:6] = 1
    expected_mask = mask[:, None, ::2, ::2]
    with torch.no_grad():
        hidden = sd.encode_prompts(PROMPTS)
        loss = diffusion_loss(sd, latents, hidden, mask=mask, noise=noise, timesteps=t)
        assert torch.allclose(loss, _written_out_loss(sd, latents, hidden, noise, t, "epsilon", expected_mask),
                              atol=1e-6)
        whole = diffusion_loss(sd, latents, hidden, mask=mask[:, None], noise=noise, timesteps=t,
                               mask_reduction="latent")
        masked_sum = _written_out_loss(sd, latents, hidden, noise, t, "epsilon", expected_mask) \
            * expected_mask.sum() * 4
        assert torch.allclose(whole, masked_sum / (2 * 4 * 16 * 16), atol=1e-6)
        tiny = torch.zeros(2, 32, 32)
        tiny[:, 5, 5] = 1  # one pixel: a quarter of a latent cell, below the 0.5 threshold
        with pytest.raises(ValueError, match=r"samples \[0, 1\] vanish"):
            diffusion_loss(sd, latents, hidden, mask=tiny, noise=noise, timesteps=t)


def test_memory_settings_keep_the_loss_and_its_gradient():
    stack = tiny_text_to_image("sd", seed=2)
    torch.manual_seed(3)
    latents = torch.randn(2, 4, 16, 16)
    noise, t = torch.randn(2, 4, 16, 16), torch.tensor([50, 700])

    def loss_and_grad(stack):
        hidden = stack.encode_prompts(PROMPTS).detach().requires_grad_(True)
        loss = diffusion_loss(stack, latents, hidden, noise=noise, timesteps=t)
        loss.backward()
        return loss.detach(), hidden.grad

    plain_loss, plain_grad = loss_and_grad(stack)
    configure_memory(stack, gradient_checkpointing=True)
    assert stack.unet.is_gradient_checkpointing
    ckpt_loss, ckpt_grad = loss_and_grad(stack)
    assert torch.allclose(ckpt_loss, plain_loss, atol=1e-6) and torch.allclose(ckpt_grad, plain_grad, atol=1e-6)
    with autocast_context("cpu", "bf16"):
        mixed = diffusion_loss(stack, latents, stack.encode_prompts(PROMPTS), noise=noise, timesteps=t)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, plain_loss, rtol=0.05)
    configure_memory(stack, frozen_dtype="bf16")
    assert stack.unet.dtype == torch.bfloat16 and stack.vae.dtype == torch.bfloat16
    assert stack.text_encoder.dtype == torch.float32
    low_loss, low_grad = loss_and_grad(stack)
    assert low_grad.dtype == torch.float32 and torch.allclose(low_loss, plain_loss, rtol=0.05)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        autocast_context("cpu", "fp8")


def test_sampling_scheduler_keeps_the_schedule(sd_v):
    ddim = sd_v.sampling_scheduler("DDIMScheduler")
    assert type(ddim).__name__ == "DDIMScheduler" and ddim.config.prediction_type == "v_prediction"
    assert torch.equal(ddim.alphas_cumprod, sd_v.noise_scheduler.alphas_cumprod)
    with pytest.raises(ValueError, match="no scheduler 'NoSuchScheduler'"):
        sd_v.sampling_scheduler("NoSuchScheduler")


def test_the_pretrained_config_entries_build():
    from omegaconf import OmegaConf

    from anomgen.encoders.clip_text import TINY_OPEN_CLIP_CONFIG, load_open_clip

    configs = Path(__file__).resolve().parents[2] / "configs" / "pretrained"
    tiny = OmegaConf.to_container(OmegaConf.load(configs / "tiny.yaml"))
    assert tiny["adp_clip"]["config"] == TINY_OPEN_CLIP_CONFIG  # the yaml repeats the code's constant
    clip = load_open_clip(**tiny["adp_clip"])
    stack = build_text_to_image(**tiny["text_to_image"], open_clip_model=clip)
    assert stack.open_clip_model is clip and stack.resolution == tiny["text_to_image"]["resolution"]
    assert stack.prediction_type == "v_prediction"
    assert torch.equal(stack.text_encoder.get_input_embeddings().weight, clip.token_embedding.weight)
    paper = OmegaConf.load(configs / "paper.yaml")
    assert paper.text_to_image.prediction_type == "v_prediction" and paper.text_to_image.resolution == 768
    assert (paper.adp_clip.model_name, paper.adp_clip.pretrained) == ("ViT-H-14", "laion2b_s32b_b79k")
    with pytest.raises(ValueError, match="resolution=64 and tiny.resolution=32 differ"):
        build_text_to_image(resolution=64, tiny={"resolution": 32})


def test_the_sd21_architecture_has_sd21s_parameter_counts_and_scales_down():
    """At scale 1 the random SD 2.1 stack has the parameter counts of stabilityai/stable-diffusion-2-1's unet, vae and
    text_encoder (built on the meta device: no memory, no init); a scaled one keeps the graph and shares the token
    table with its open_clip classifier, as SD 2.x and ViT-H-14 do."""
    full = random_sd21_stack(device="meta")
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in full.modules().items()}
    assert counts == {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840,
                      "open_clip_model": 986_109_441}
    config = full.text_encoder.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size,
            config.hidden_act, config.vocab_size) == (23, 1024, 16, 4096, "gelu", 49408)
    assert full.resolution == 768 and full.prediction_type == "v_prediction" and full.latent_factor == 8
    assert full.scaling_factor == pytest.approx(0.18215) and full.unet.config.upcast_attention

    small = random_sd21_stack(scale=1 / 16, resolution=64, seed=1)
    assert small.unet.config.block_out_channels == (20, 40, 80, 80) and small.text_width == 64
    assert small.unet.config.attention_head_dim == (5, 10, 20, 20) and small.resolution == 64
    assert small.text_encoder.config.num_hidden_layers == 23
    assert torch.equal(small.text_encoder.get_input_embeddings().weight,
                       small.open_clip_model.token_embedding.weight)
    assert not any(p.requires_grad for m in small.modules().values() for p in m.parameters())
    with pytest.raises(ValueError, match="multiple of 1/16"):
        sd21_architecture(scale=0.1)
    with pytest.raises(ValueError, match="multiple of 64"):
        sd21_architecture(resolution=100)
