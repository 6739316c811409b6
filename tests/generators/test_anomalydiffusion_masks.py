"""AnomalyDiffusion's mask model and its files on a tiny LDM: the border rule and the other rejections on hand-made
masks, giving up after N tries with the defect type named, the seeded sampler (a mask does not depend on its batch),
a textual-inversion step that moves only the type's vectors, the two files written and read back (the embedding's
too), and the augmentation's fallback for masks it would ruin."""

from __future__ import annotations

import pytest
import torch

from anomgen.diffusion.text2image import tiny_text_to_image
from anomgen.generators.anomalydiffusion import (
    AnomalyAugmentation,
    AnomalyEmbedding,
    augment_or_keep,
    check_masks,
    load_anomaly_embedding,
    save_anomaly_embedding,
)
from anomgen.generators.anomalydiffusion_masks import (
    MaskEmbedding,
    MaskGenerationError,
    border_lines,
    first_acceptable,
    load_mask_embedding,
    mask_loss,
    mask_optimizer,
    mask_rejection,
    masks_from_images,
    sample_masks,
    save_mask_embedding,
)
from anomgen.seeding import sample_generator

TYPES = ["broken", "crack"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors on one thread (the root conftest's ``one_thread``)."""


@pytest.fixture(scope="module")
def stack():
    return tiny_text_to_image("ldm")


def _mask_model(stack, n=2):
    return MaskEmbedding.from_stack(stack, TYPES, num_vectors=n)


# ------------------------------------------------------------------------------------------------ rejection


def test_the_border_rule_and_the_other_rejections_on_hand_made_masks():
    mask = torch.zeros(30, 30)
    mask[0, :10] = 1  # the top row: 10 of 30 set, not more than a third
    mask[5:12, 5:12] = 1
    assert border_lines(mask) == [] and mask_rejection(mask) is None
    mask[0, 10] = 1  # 11 of 30
    assert border_lines(mask) == ["top"] and mask_rejection(mask) == "border"
    side = torch.zeros(30, 30)
    side[:, -1] = 1  # the right column, all of it
    side[29, :11] = 1  # and the bottom row, 11 of 30
    assert border_lines(side) == ["bottom", "right"]
    assert border_lines(side, fraction=1.0) == []  # no line has more than all its pixels
    inner = torch.zeros(30, 30)
    inner[1, :] = 1  # the second row is no border line
    assert border_lines(inner) == []
    assert mask_rejection(torch.zeros(30, 30)) == "empty"
    speck = torch.zeros(32, 32)
    speck[10, 10] = 1
    assert mask_rejection(speck) is None
    assert mask_rejection(speck, latent_size=(16, 16)) == "vanishes"  # a quarter of a latent cell
    assert mask_rejection(speck, export_size=(8, 8)) == "vanishes at export size"
    assert mask_rejection(torch.ones(32, 32), border_fraction=1.0, latent_size=(16, 16)) == "covers"
    decoded = torch.zeros(1, 3, 4, 4)
    decoded[0, :, 0, 0] = 0.95  # 0.9 on [-1, 1]: set
    decoded[0, :, 0, 1] = 0.9  # 0.8: not strictly above
    assert masks_from_images(decoded)[0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_giving_up_after_n_tries_names_the_defect_type(stack):
    drawn = []

    def border_masks(attempt: int) -> torch.Tensor:
        drawn.append(attempt)
        mask = torch.zeros(30, 30)
        mask[:, 0] = 1
        return mask

    with pytest.raises(MaskGenerationError, match=r"defect type 'crack': no acceptable mask in 5 tries "
                                                  r"\(rejected: 5 border"):
        first_acceptable(border_masks, mask_rejection, 5, "defect type 'crack'")
    assert drawn == [0, 1, 2, 3, 4]  # exactly N draws, never more
    mask, tries = first_acceptable(_blob, mask_rejection, 5, "x")  # empty first, then a blob
    assert tries == 2 and mask.sum() > 0
    # the sampler itself: a threshold nothing passes (the channel mean on [-1, 1] never exceeds 1)
    with pytest.raises(MaskGenerationError, match=r"mask generation for defect type 'crack': no acceptable mask in "
                                                  r"2 tries \(rejected: 2 empty"):
        sample_masks(stack, _mask_model(stack), [1], [sample_generator(0, 0)], steps=2, threshold=1.0, max_tries=2)


def _blob(attempt: int) -> torch.Tensor:
    mask = torch.zeros(30, 30)
    if attempt >= 1:
        mask[10:15, 10:15] = 1
    return mask


def test_the_sampler_is_seeded_and_a_mask_does_not_depend_on_its_batch(stack):
    model = _mask_model(stack)
    settings = {"steps": 3, "threshold": 0.3, "latent_size": (16, 16), "export_size": (32, 32)}
    gens = [sample_generator(0, i) for i in range(3)]
    whole = sample_masks(stack, model, [0, 1, 0], gens, **settings)
    again = sample_masks(stack, model, [0, 1, 0], [sample_generator(0, i) for i in range(3)], **settings)
    alone = sample_masks(stack, model, [1], [sample_generator(0, 1)], **settings)
    other = sample_masks(stack, model, [0, 1, 0], [sample_generator(1, i) for i in range(3)], **settings)
    assert whole.masks.shape == (3, 32, 32) and set(whole.masks.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(whole.masks, again.masks) and whole.tries == again.tries and whole.templates == again.templates
    assert torch.equal(alone.masks[0], whole.masks[1]) and alone.tries[0] == whole.tries[1]
    assert not torch.equal(other.masks, whole.masks)
    assert all(mask_rejection(m, 1 / 3, (16, 16), (32, 32)) is None for m in whole.masks)


# ------------------------------------------------------------------------------------------------ training, files


def test_a_mask_step_moves_only_the_vectors_of_the_types_in_the_batch(stack):
    model = _mask_model(stack)
    frozen = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in stack.modules().items()}
    before = model.vectors.detach().clone()
    masks = torch.zeros(2, 32, 32)
    masks[:, 8:20, 6:14] = 1
    optimizer = mask_optimizer(model, lr=0.02, weight_decay=0.0)
    loss = mask_loss(stack, model, masks, [1, 1], torch.Generator().manual_seed(0))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert torch.equal(model.vectors[0], before[0])  # "broken" is not in the batch
    assert not torch.equal(model.vectors[1], before[1])
    for name, module in stack.modules().items():
        assert all(torch.equal(module.state_dict()[k], v) for k, v in frozen[name].items()), f"{name} changed"


def test_the_files_are_written_and_read_back(stack, tmp_path):
    from anomgen.encoders.clip_text import load_concepts

    model = _mask_model(stack, n=3)
    with torch.no_grad():
        model.vectors.add_(torch.randn_like(model.vectors))
    path = save_mask_embedding(tmp_path / "masks.safetensors", model, {"category": "bottle"})
    read = load_mask_embedding(path, width=stack.text_width)
    assert read.type_names == TYPES and read.info == {"category": "bottle"} and torch.equal(read.vectors, model.vectors)
    concepts = load_concepts(path)  # diffusers' textual-inversion layout, one entry per type
    assert list(concepts) == ["<mask:broken>", "<mask:crack>"] and concepts["<mask:crack>"].shape == (3, 32)
    with pytest.raises(ValueError, match="width 32; the text encoder expects 1280"):
        load_mask_embedding(path, width=1280)

    embedding = AnomalyEmbedding.from_stack(stack, 2, 2, 2, encoder={"channels": (8, 8, 16, 16), "head_channels": 16},
                                            type_names=TYPES)
    file = save_anomaly_embedding(tmp_path / "embedding.safetensors", embedding, {"category": "bottle"})
    loaded = load_anomaly_embedding(file, width=32)
    assert loaded.type_names == TYPES and loaded.info == {"category": "bottle"}
    masks = torch.zeros(1, 32, 32)
    masks[0, 4:12, 4:12] = 1
    assert torch.equal(loaded.tokens([1], masks), embedding.tokens([1], masks))
    with pytest.raises(ValueError, match="not an AnomalyDiffusion embedding file"):
        load_anomaly_embedding(path)
    with pytest.raises(ValueError, match="not an AnomalyDiffusion mask file"):
        load_mask_embedding(file)


def test_augmentation_keeps_a_sample_whose_mask_it_would_ruin_and_bad_masks_are_named():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 32, 32)
    masks[0, 2:30, 2:30] = 1  # a crop that keeps this box fills the whole latent grid
    masks[1, 12:16, 12:16] = 1
    crop_only = AnomalyAugmentation(p=1.0, flip_p=0.0, rotation=(0.0, 0.0))
    kept_any = False
    for seed in range(12):
        out, out_masks, kept = augment_or_keep(crop_only, images, masks, (16, 16), torch.Generator().manual_seed(seed))
        assert torch.equal(out_masks[kept], masks[kept, None]) and torch.equal(out[kept], images[kept])
        check_masks(out_masks, (16, 16))  # what comes out is always usable
        kept_any |= 0 in kept
    assert kept_any
    bad = torch.zeros(2, 32, 32)
    bad[0, 4:10, 4:10] = 1
    bad[1] = 1
    with pytest.raises(ValueError, match=r"samples \['b_mask.png'\] cover the whole"):
        check_masks(bad, (16, 16), names=["a_mask.png", "b_mask.png"])
