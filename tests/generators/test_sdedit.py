"""SDEdit pseudo-anomalies: equal to diffusers' StableDiffusionImg2ImgPipeline on the same tiny model, the same
embeddings, settings and generator(s), for deterministic, stochastic and v-prediction schedulers; strength 0 is the
VAE round trip (where the pipeline fails); a sample does not depend on its batch; crop boxes are torchvision's and are
fixed by the seed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from anomgen.generators.sdedit import SDEditConfig, SDEditGenerator, edit_timesteps, sdedit
from anomgen.pixels import from_diffusion_range, random_resized_crop_box, resized_crop, to_diffusion_range
from anomgen.seeding import sample_generator

SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
#: Stable Diffusion's scheduler configs (the default PNDM, DDIM, DDPM, Euler) and SD 2.1's v-prediction DDIM; all with
#: steps_offset 1, which the pipeline's constructor would otherwise write into the scheduler's config behind our back
SCHEDULERS = {
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1}),
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False, "steps_offset": 1}),
    "euler": ("EulerDiscreteScheduler", {"steps_offset": 1}),
    "ddim_v": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                                 "prediction_type": "v_prediction"}),
}
D = 32  # text width = cross-attention width
SETTINGS = {"strength": 0.7, "num_inference_steps": 6, "guidance_scale": 7.5}  # 4 denoising steps


class Stack:
    def __init__(self, unet, vae, scheduler):
        self.unet, self.vae, self.scheduler = unet, vae, scheduler


def make_scheduler(kind: str):
    import diffusers

    name, kwargs = SCHEDULERS[kind]
    return getattr(diffusers, name)(**SD_BETAS, **kwargs)


@pytest.fixture(scope="module")
def parts():
    """A tiny random UNet2DConditionModel, AutoencoderKL (32 px -> 16 px latents) and CLIP text model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=D, attention_head_dim=4,
            norm_num_groups=8).eval()
        vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            latent_channels=4, norm_num_groups=8, sample_size=32).eval()
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=D, intermediate_size=37, num_attention_heads=4,
                                                    num_hidden_layers=1, vocab_size=1000, bos_token_id=0,
                                                    eos_token_id=2, pad_token_id=1)).eval()
    return unet, vae, text_encoder


def _images(n=2, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _embeds(n=2, seed=2):
    return torch.randn(n, 77, D, generator=torch.Generator().manual_seed(seed))


def _generator(kind: str, n=2, seed=5):
    if kind == "one":
        return torch.Generator().manual_seed(seed)
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _pipeline(parts, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    unet, vae, text_encoder = parts
    pipe = StableDiffusionImg2ImgPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("generators", ["one", "per_sample"])
@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_equal_to_the_img2img_pipeline(parts, kind, generators, one_thread):
    images, prompt, negative = _images(), _embeds(seed=2), _embeds(seed=3)
    pipe = _pipeline(parts, make_scheduler(kind))
    # the pipeline maps [0, 1] tensors to [-1, 1] itself (its preprocessing) and returns [0, 1] (output_type="pt")
    expected = pipe(image=images, prompt_embeds=prompt, negative_prompt_embeds=negative,
                    generator=_generator(generators), output_type="pt", **SETTINGS).images
    stack = Stack(parts[0], parts[1], make_scheduler(kind))
    out = sdedit(stack, images, prompt, negative, generator=_generator(generators), **SETTINGS)
    assert out.shape == expected.shape == (2, 3, 32, 32)
    # one generator: bit for bit; one per sample: the pipeline encodes image by image, sdedit as one batch
    assert (out - expected).abs().max() < 1e-5
    assert (out[0] - out[1]).abs().max() > 1e-2  # two different images, not a constant output


def test_equal_to_the_pipeline_on_pil_images(parts, one_thread):
    """PIL input (8-bit, the pipeline's usual input): the same 8-bit pixels as a [0, 1] tensor give the same edit."""
    from PIL import Image

    from anomgen.pixels import to_uint8

    pixels = to_uint8(_images())
    pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
    prompt, negative = _embeds(seed=2), _embeds(seed=3)
    expected = _pipeline(parts, make_scheduler("pndm"))(
        image=pil, prompt_embeds=prompt, negative_prompt_embeds=negative, generator=_generator("one"),
        output_type="pt", **SETTINGS).images
    out = sdedit(Stack(parts[0], parts[1], make_scheduler("pndm")), pixels.float() / 255, prompt, negative,
                 generator=_generator("one"), **SETTINGS)
    assert (out - expected).abs().max() < 1e-5


def test_prompt_guidance_and_prediction_type_change_the_output(parts, one_thread):
    """The agreement above is not that of a network that ignores its inputs."""
    images, prompt, negative = _images(), _embeds(seed=2), _embeds(seed=3)

    def run(kind="ddim", prompt=prompt, **kw):
        settings = {**SETTINGS, **kw}
        return sdedit(Stack(parts[0], parts[1], make_scheduler(kind)), images, prompt, negative,
                      generator=_generator("one"), **settings)

    base = run()
    assert torch.equal(base, run())
    for other in (run(prompt=_embeds(seed=4)), run(guidance_scale=2.0), run(kind="ddim_v"), run(strength=0.4)):
        assert (other - base).abs().max() > 1e-3


def test_strength_zero_is_the_vae_round_trip(parts, one_thread):
    """No step to run (int(steps · strength) = 0): the decoded posterior sample, which the random VAE does not make
    the input image; diffusers' pipeline fails there (an empty timestep batch)."""
    images, prompt, negative = _images(), _embeds(seed=2), _embeds(seed=3)
    unet, vae, _ = parts
    for strength in (0.0, 0.1):  # int(6 · 0.1) = 0 too
        out = sdedit(Stack(unet, vae, make_scheduler("ddim")), images, prompt, negative, strength=strength,
                     num_inference_steps=6, guidance_scale=7.5, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            posterior = vae.encode(to_diffusion_range(images)).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5))
            z = (posterior.mean + posterior.std * noise) * vae.config.scaling_factor
            round_trip = from_diffusion_range(vae.decode(z / vae.config.scaling_factor).sample)
        assert torch.equal(out, round_trip)
        assert (out - images).abs().mean() > 0.05  # the round trip of a random VAE is far from the identity
    assert len(edit_timesteps(make_scheduler("ddim"), 6, 0.1)) == 0
    with pytest.raises(RuntimeError):
        _pipeline(parts, make_scheduler("ddim"))(image=images, prompt_embeds=prompt,
                                                 negative_prompt_embeds=negative, strength=0.0, num_inference_steps=6,
                                                 generator=torch.Generator().manual_seed(5), output_type="pt")


def test_edit_starts_where_img2img_starts():
    scheduler = make_scheduler("ddim")
    timesteps = edit_timesteps(scheduler, 50, 0.8)
    assert len(timesteps) == 40 and torch.equal(timesteps, scheduler.timesteps[10:])
    assert len(edit_timesteps(make_scheduler("ddim"), 50, 1.0)) == 50
    for strength in (-0.1, 1.1):
        with pytest.raises(ValueError, match="strength"):
            SDEditConfig(strength=strength)


def test_guidance_needs_the_negative_embeddings(parts):
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        sdedit(Stack(parts[0], parts[1], make_scheduler("ddim")), _images(), _embeds(), None, guidance_scale=7.5)


def _generate(stack_parts, indices, images, kind="ddpm", seed=3, **config):
    generator = SDEditGenerator(Stack(stack_parts[0], stack_parts[1], make_scheduler(kind)),
                                **{**SETTINGS, **config})
    prompts = [f"prompt {i % 2}" for i in indices]
    out, params = generator(images, _embeds(len(indices), seed=2), _embeds(1, seed=3),
                            [sample_generator(seed, i) for i in indices], size=(24, 24), prompts=prompts)
    return out, params


def test_a_sample_does_not_depend_on_its_batch(parts, one_thread):
    """Batch of 4 == batches 2 + 2, the stochastic DDPM scheduler drawing from each sample's own generator."""
    images = _images(4)
    embeds = _embeds(4, seed=2)
    generator = SDEditGenerator(Stack(parts[0], parts[1], make_scheduler("ddpm")), **SETTINGS)

    def run(rows):
        return generator(images[rows], embeds[rows], _embeds(1, seed=3), [sample_generator(3, i) for i in rows],
                         size=(24, 24), prompts=[f"prompt {i}" for i in rows])

    whole, params = run([0, 1, 2, 3])
    first, params_a = run([0, 1])
    second, params_b = run([2, 3])
    assert whole.shape == (4, 3, 24, 24) and 0 <= whole.min() and whole.max() <= 1
    assert (whole - torch.cat([first, second])).abs().max() < 1e-5
    assert params == params_a + params_b
    boxes = [tuple(p["crop_box"]) for p in params]
    assert len(set(boxes)) == 4  # one draw per sample


def test_params_are_recorded_per_sample_and_json_serialisable(parts, one_thread):
    out, params = _generate(parts, [0, 1], _images(2), kind="ddim", strength=0.5)
    assert out.shape == (2, 3, 24, 24)
    for i, p in enumerate(params):
        json.dumps(p)
        assert p["prompt"] == f"prompt {i % 2}"
        assert (p["strength"], p["num_inference_steps"], p["guidance_scale"]) == (0.5, 6, 7.5)
        assert p["denoising_steps"] == 3 and p["scheduler"] == "DDIMScheduler" and p["prediction_type"] == "epsilon"
        top, left, h, w = p["crop_box"]
        assert all(isinstance(v, int) for v in p["crop_box"])
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 32
        area = h * w / 32**2
        assert 0.08 * 0.9 <= area <= 1.0 and 0.75 * 0.85 <= w / h <= 4 / 3 / 0.85  # rounding of small boxes


def test_the_crop_is_a_resized_crop_of_the_edit(parts, one_thread):
    """Sample i: its crop box drawn first from its generator, then SDEdit from the same generator, then the crop of
    the edit resized to the requested size; with crop=False no box is drawn and the whole edit is resized."""
    images, indices = _images(2), [5, 6]
    cropped, params = _generate(parts, indices, images, kind="ddim")
    whole, whole_params = _generate(parts, indices, images, kind="ddim", crop=False)
    assert [p["crop_box"] for p in whole_params] == [[0, 0, 32, 32]] * 2
    prompt, negative = _embeds(2, seed=2), _embeds(1, seed=3)
    for j, index in enumerate(indices):
        stack = Stack(parts[0], parts[1], make_scheduler("ddim"))
        generator = sample_generator(3, index)
        box = random_resized_crop_box(32, 32, generator=generator)
        assert list(box) == params[j]["crop_box"]
        edit = sdedit(stack, images[j : j + 1], prompt[j : j + 1], negative, generator=[generator], **SETTINGS)
        assert (cropped[j] - resized_crop(edit, box, (24, 24))[0]).abs().max() < 1e-5
        edit = sdedit(stack, images[j : j + 1], prompt[j : j + 1], negative, generator=[sample_generator(3, index)],
                      **SETTINGS)
        assert (whole[j] - resized_crop(edit, (0, 0, 32, 32), (24, 24))[0]).abs().max() < 1e-5


@pytest.mark.parametrize("size", [(32, 32), (20, 50), (50, 7)])
def test_crop_box_is_torchvisions_and_fixed_by_the_seed(size):
    from torchvision.transforms import RandomResizedCrop

    height, width = size
    settings = [((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 0.9), (0.5, 2.0)), ((0.9, 1.0), (3.0, 4.0))]  # the last: fallback
    for scale, ratio in settings:
        for seed in range(25):
            torch.manual_seed(seed)
            expected = RandomResizedCrop.get_params(torch.zeros(3, height, width), list(scale), list(ratio))
            box = random_resized_crop_box(height, width, scale, ratio, torch.Generator().manual_seed(seed))
            assert box == tuple(expected)
            assert box == random_resized_crop_box(height, width, scale, ratio, torch.Generator().manual_seed(seed))
    boxes = {random_resized_crop_box(height, width, generator=sample_generator(0, i)) for i in range(20)}
    assert len(boxes) > 5  # many different boxes (few distinct ones fit a 7 px wide image)


def test_resized_crop_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    image = torch.rand(3, 30, 40, generator=torch.Generator().manual_seed(0))
    box = (3, 5, 20, 27)
    expected = TF.resized_crop(image, *box, size=[16, 16], antialias=True).clamp(0, 1)
    assert (resized_crop(image, box, (16, 16)) - expected).abs().max() < 1e-5
    assert math.isclose(float(resized_crop(image[None], box, (20, 27))[0].sub(image[:, 3:23, 5:32]).abs().max()), 0.0)
