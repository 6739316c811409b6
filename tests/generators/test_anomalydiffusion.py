"""AnomalyDiffusion's generation core on tiny SD and LDM stacks: the spatial embedding injected where "{}" stands
(equal to encoding the same token vectors as words), a training step that moves only e_a and the mask encoder, both
loss reductions, bad masks refused by name, the augmentation (seeded, box kept, image and mask together), blended
generation (the final blend makes the unmasked latent the normal one bit for bit; AAR wired per step and removed
afterwards), per-sample generators (a sample does not depend on its batch) and seeded determinism."""

from __future__ import annotations

import pytest
import torch

from anomgen.diffusion.attention import AdaptiveAttentionProcessor, dilate_mask, dilation_radius
from anomgen.diffusion.text2image import encode_latents, latent_mask, tiny_text_to_image
from anomgen.generators.anomalydiffusion import (
    TEMPLATES_SMALL,
    AnomalyAugmentation,
    AnomalyDiffusionConfig,
    AnomalyEmbedding,
    anomaly_loss,
    anomaly_optimizer,
    blended_generate,
    encode_spatial,
    keep_box_crop,
    spatial_input_ids,
    word_embedding,
)
from anomgen.seeding import sample_generator

ENCODER = {"channels": (8, 8, 16, 16), "head_channels": 16}
STEPS = 4


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors on one thread (the root conftest's ``one_thread``)."""


@pytest.fixture(scope="module")
def stacks():
    return {"sd": tiny_text_to_image("sd"), "ldm": tiny_text_to_image("ldm")}


def _embedding(stack, k=4, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AnomalyEmbedding.from_stack(stack, num_types=3, num_type_tokens=k, encoder=ENCODER,
                                           type_names=["bottle+crack", "bottle+hole", "wood+color"])


def _batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 32, 32, generator=g)
    masks = torch.zeros(n, 32, 32)
    for i in range(n):
        top, left = 4 + 3 * i, 6 + 2 * i
        masks[i, top:top + 10, left:left + 8] = 1
    return images, masks


def _gens(indices, base=7):
    return [sample_generator(base, i) for i in indices]


# ------------------------------------------------------------------------------------------------ embedding, prompts


@pytest.mark.parametrize("kind", ["sd", "ldm"])
def test_tokens_replace_the_placeholder_like_words_would(stacks, kind):
    stack = stacks[kind]
    emb = _embedding(stack)
    _, masks = _batch(2)
    tokens = emb.tokens([0, 2], masks)
    assert tokens.shape == (2, 4 + 4, stack.text_width) and emb.num_tokens == 8
    assert torch.equal(emb.type_tokens[1], word_embedding(stack, "anomaly").expand(4, -1))  # e_a starts at the word
    assert emb.type_index("wood+color") == 2
    # vectors that are the table rows of real words give exactly the encoding of the prompt with those words
    ids = stack.tokenizer("damaged object", add_special_tokens=False).input_ids
    rows = stack.text_encoder.get_input_embeddings().weight[ids].detach()
    prompt = encode_spatial(stack, rows[None].repeat(2, 1, 1), ["a photo of a {}", "{} with damage"])
    expected = stack.encode_prompts(["a photo of a damaged object", "damaged object with damage"])
    assert prompt.hidden_states.shape == (2, 77, stack.text_width)
    assert (prompt.hidden_states - expected).abs().max() < 1e-5
    head = len(stack.tokenizer("a photo of a", add_special_tokens=False).input_ids)
    assert prompt.columns[0].nonzero().flatten().tolist() == list(range(1 + head, 1 + head + len(ids)))
    assert prompt.columns[1].nonzero().flatten().tolist() == list(range(1, 1 + len(ids)))
    code = prompt.aar_columns("code")
    assert code[:, 0].all() and torch.equal(code[:, 1:], prompt.columns[:, 1:])


def test_the_sequence_is_cut_at_77_tokens(stacks):
    tokenizer = stacks["ldm"].tokenizer
    long = "a " * 70 + "{} end"
    ids, columns = spatial_input_ids(tokenizer, [long, TEMPLATES_SMALL[0]], 12)
    assert ids.shape == (2, 77) and columns[0].sum() == 77 - 71 and columns[1].sum() == 12
    assert ids[0, -1] != tokenizer.sep_token_id  # cut as the reference cuts: the end token is gone
    tokens = torch.randn(2, 12, stacks["ldm"].text_width)
    assert encode_spatial(stacks["ldm"], tokens, [long, TEMPLATES_SMALL[0]]).hidden_states.shape[1] == 77
    with pytest.raises(ValueError, match="exactly one"):
        spatial_input_ids(tokenizer, ["a photo of {} and {}"], 2)


# ------------------------------------------------------------------------------------------------ training step


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("kind", ["sd", "ldm"])
def test_a_loss_step_trains_only_the_embedding(stacks, kind):
    stack = stacks[kind]
    emb = _embedding(stack)
    frozen = {name: _state(module) for name, module in stack.modules().items()}
    before = _state(emb)
    images, masks = _batch(2)
    optimizer = anomaly_optimizer(emb, lr=5e-3)
    loss = anomaly_loss(stack, emb, images, masks, [0, 2], torch.Generator().manual_seed(0),
                        augmentation=AnomalyAugmentation(p=1.0))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    for name, module in stack.modules().items():
        after = module.state_dict()
        assert all(torch.equal(after[k], v) for k, v in frozen[name].items()), f"{name} changed"
    after = emb.state_dict()
    assert not torch.equal(after["type_tokens"][0], before["type_tokens"][0])
    assert not torch.equal(after["type_tokens"][2], before["type_tokens"][2])
    assert torch.equal(after["type_tokens"][1], before["type_tokens"][1])  # not in the batch
    changed = [k for k in before if k.startswith("mask_encoder.") and not torch.equal(after[k], before[k])]
    assert any(k.startswith("mask_encoder.heads.") for k in changed)
    assert any(k.startswith("mask_encoder.stem.") for k in changed)


def test_the_two_reductions_differ_by_the_mask_area(stacks):
    stack = stacks["ldm"]
    emb = _embedding(stack)
    images, masks = _batch(2)
    with torch.no_grad():
        by_mask = anomaly_loss(stack, emb, images, masks, [0, 1], torch.Generator().manual_seed(3))
        by_latent = anomaly_loss(stack, emb, images, masks, [0, 1], torch.Generator().manual_seed(3),
                                 mask_reduction="latent")
    latent_pixels = 2 * 16 * 16
    area = latent_mask(masks, (16, 16)).sum().item()
    assert 0 < area < latent_pixels
    assert by_latent.item() == pytest.approx(by_mask.item() * area / latent_pixels, rel=1e-5)
    latents = encode_latents(stack, images, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # cached latents instead of images
        assert torch.isfinite(anomaly_loss(stack, emb, None, masks, [0, 1], latents=latents))


def test_bad_masks_are_refused_naming_the_sample(stacks):
    stack = stacks["sd"]
    emb = _embedding(stack)
    images, masks = _batch(3)
    tiny = masks.clone()
    tiny[1] = 0
    tiny[1, 5, 5] = 1  # one pixel: 0.25 on the 2× coarser grid, below the 0.5 threshold
    full = masks.clone()
    full[2] = 1
    for bad, what in ((tiny, r"samples \[1\] vanish"), (full, r"samples \[2\] cover the whole")):
        with pytest.raises(ValueError, match=what):
            anomaly_loss(stack, emb, images, bad, [0, 1, 2], torch.Generator().manual_seed(0))
        with pytest.raises(ValueError, match=what):
            blended_generate(stack, emb, images, bad, [0, 1, 2], _gens(range(3)), steps=2)
    with pytest.raises(ValueError, match="type ids"):
        anomaly_loss(stack, emb, images, masks, [0, 1, 3], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="mask_reduction"):
        AnomalyDiffusionConfig(mask_reduction="sum")


def test_augmentation_is_seeded_keeps_the_box_and_moves_image_and_mask_together():
    _, masks = _batch(3)
    for seed in range(40):
        top, left, h, w = keep_box_crop(masks[2], torch.Generator().manual_seed(seed))
        assert top <= 10 and left <= 10 and top + h >= 20 and left + w >= 18  # the box rows 10-19, cols 10-17
    assert keep_box_crop(torch.zeros(8, 8)) == (0, 0, 8, 8)
    augment = AnomalyAugmentation(p=1.0, fill=0.0)
    images = masks[:, None].repeat(1, 3, 1, 1)  # the image is the mask: both must move alike
    out, out_masks = augment(images, masks, torch.Generator().manual_seed(5))
    again, again_masks = augment(images, masks, torch.Generator().manual_seed(5))
    other, _ = augment(images, masks, torch.Generator().manual_seed(6))
    assert torch.equal(out, again) and torch.equal(out_masks, again_masks) and not torch.equal(out, other)
    assert out.shape == (3, 3, 32, 32) and out_masks.shape == (3, 1, 32, 32)
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0} and (out_masks.flatten(1).sum(1) > 0).all()
    agreement = ((out[:, :1] >= 0.5) == (out_masks >= 0.5)).float().mean()
    assert agreement > 0.97
    unchanged, _ = AnomalyAugmentation(p=0.0)(images, masks, torch.Generator().manual_seed(5))
    assert torch.equal(unchanged, images)


# ------------------------------------------------------------------------------------------------ generation


@pytest.mark.parametrize("kind", ["sd", "ldm"])
def test_the_final_blend_keeps_the_normal_latent_outside_the_mask(stacks, kind):
    stack = stacks[kind]
    emb = _embedding(stack)
    images, masks = _batch(2)
    blended = blended_generate(stack, emb, images, masks, [0, 1], _gens([0, 1]), steps=STEPS, final_blend=True)
    plain = blended_generate(stack, emb, images, masks, [0, 1], _gens([0, 1]), steps=STEPS, final_blend=False)
    outside = blended.latent_masks == 0
    assert blended.images.shape == (2, 3, 32, 32) and 0 <= blended.images.min() and blended.images.max() <= 1
    assert blended.latents.shape == (2, 4, 16, 16) and blended.latent_masks.shape == (2, 1, 16, 16)
    assert torch.equal(blended.masks, masks)  # the input masks, at image size
    assert torch.equal(blended.normal_latents, plain.normal_latents)
    out_b, out_p, z0 = blended.latents, plain.latents, blended.normal_latents
    assert torch.equal(out_b[outside.expand_as(z0)], z0[outside.expand_as(z0)])  # bit for bit
    assert (out_p - z0)[outside.expand_as(z0)].abs().max() > 1e-4  # the code's way: not so
    inside = ~outside.expand_as(z0)
    assert torch.equal(out_b[inside], out_p[inside])


def test_a_sample_does_not_depend_on_its_batch_and_runs_are_seeded(stacks):
    stack = stacks["sd"]
    emb = _embedding(stack)
    images, masks = _batch(3)
    settings = {"steps": STEPS, "aar": "code"}
    whole = blended_generate(stack, emb, images, masks, [0, 1, 2], _gens(range(3)), **settings)
    again = blended_generate(stack, emb, images, masks, [0, 1, 2], _gens(range(3)), **settings)
    first = blended_generate(stack, emb, images[:2], masks[:2], [0, 1], _gens([0, 1]), **settings)
    last = blended_generate(stack, emb, images[2:], masks[2:], [2], _gens([2]), **settings)
    assert torch.equal(whole.images, again.images) and whole.templates == again.templates
    assert (whole.latents - torch.cat([first.latents, last.latents])).abs().max() < 1e-5
    assert whole.templates == first.templates + last.templates
    other = blended_generate(stack, emb, images, masks, [0, 1, 2], _gens(range(3), base=8), **settings)
    assert not torch.equal(other.latents, whole.latents)


@pytest.mark.parametrize("aar", ["paper", "code"])
def test_aar_is_wired_per_step_and_removed_afterwards(stacks, aar):
    stack = stacks["ldm"]
    emb = _embedding(stack)
    images, masks = _batch(2)
    before = dict(stack.unet.attn_processors)
    seen = []

    def spy(module, args, kwargs):
        processors = [p for p in module.attn_processors.values() if isinstance(p, AdaptiveAttentionProcessor)]
        current = processors[0].controller.current if processors else None
        seen.append((int(args[1]), current))

    handle = stack.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        out = blended_generate(stack, emb, images, masks, [0, 1], _gens([0, 1]), steps=STEPS, aar=aar)
        guided = blended_generate(stack, emb, images, masks, [0, 1], _gens([0, 1]), steps=2, aar=aar,
                                  guidance_scale=3.0)
    finally:
        handle.remove()
    off = blended_generate(stack, emb, images, masks, [0, 1], _gens([0, 1]), steps=STEPS, aar="off")
    assert all(stack.unet.attn_processors[k] is v for k, v in before.items())  # only while generating
    assert (out.latents - off.latents).abs().max() > 1e-5
    steps = seen[:STEPS]
    assert [t for t, _ in steps] == [751, 501, 251, 1]
    if aar == "paper":
        assert steps[0][1] is None  # no x̂₀ before the first step
        for _, current in steps[1:]:
            assert current.form == "paper" and not current.columns[:, 0].any()
            assert torch.allclose(current.weight.flatten(1).sum(1), out.latent_masks.flatten(1).sum(1))
    else:
        for t, current in steps:
            assert current.form == "code" and current.columns[:, 0].all()
            assert current.columns.sum(1).tolist() == [1 + emb.num_tokens] * 2
            dilated = dilate_mask(out.latent_masks, dilation_radius(t))[:, 0]
            assert (current.weight[dilated == 0] == 1).all() and current.weight.max() <= 1.5
    for _, current in seen[STEPS:]:  # guided: the unconditional half is left alone
        if current is not None:
            assert current.weight.shape[0] == 4 and not current.columns[:2].any() and current.columns[2:].any()
    assert guided.images.shape == (2, 3, 32, 32)
