"""Textual inversion: placeholders added as diffusers names them, only their rows train (bit for bit), prompts that
no longer fit are refused, and diffusers' own pipeline reads the saved concept and encodes prompts identically."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from anomgen.diffusion.text2image import diffusion_loss, tiny_text_to_image, to_pipeline
from anomgen.diffusion.textual_inversion import TextualInversion, placeholder_tokens
from anomgen.encoders.clip_text import CLIP_VOCAB_SIZE, encode_text_open_clip, save_concepts


@pytest.fixture(scope="module")
def base():
    return tiny_text_to_image("sd")


def _fresh(stack):
    """A stack whose tokenizer and text encoder are copies (a concept added to it leaves ``stack`` alone)."""
    return dataclasses.replace(stack, tokenizer=copy.deepcopy(stack.tokenizer),
                               text_encoder=copy.deepcopy(stack.text_encoder))


def test_placeholders_are_added_and_initialised(base):
    stack = _fresh(base)
    table = stack.text_encoder.get_input_embeddings().weight.detach().clone()
    ti = TextualInversion(stack.tokenizer, stack.text_encoder, "<obj>", num_vectors=3, initializer="object")
    assert ti.tokens == placeholder_tokens("<obj>", 3) == ["<obj>", "<obj>_1", "<obj>_2"]
    assert ti.token_ids == [CLIP_VOCAB_SIZE, CLIP_VOCAB_SIZE + 1, CLIP_VOCAB_SIZE + 2]
    assert ti.embedding_weight.shape == (CLIP_VOCAB_SIZE + 3, 32)
    word = stack.tokenizer.convert_tokens_to_ids("object</w>")
    assert torch.equal(ti.learned_embeddings(), table[word].expand(3, 32))
    assert torch.equal(ti.embedding_weight.detach()[:CLIP_VOCAB_SIZE], table)
    # a word of several tokens: every vector starts at the mean of its tokens' embeddings
    pieces = stack.tokenizer("screwdriverlike", add_special_tokens=False).input_ids
    assert len(pieces) > 1
    multi = TextualInversion(stack.tokenizer, stack.text_encoder, "<multi>", 2, initializer="screwdriverlike")
    assert torch.allclose(multi.learned_embeddings(), table[pieces].mean(0).expand(2, 32))
    # vectors (another concept's) as the start
    other = TextualInversion(stack.tokenizer, stack.text_encoder, "<other>", 3, initializer=ti.learned_embeddings())
    assert torch.equal(other.learned_embeddings(), ti.learned_embeddings())
    assert ti.expand("a <obj> and a <obj>") == "a <obj> <obj>_1 <obj>_2 and a <obj> <obj>_1 <obj>_2"
    ids = ti.input_ids("a photo of <obj>")
    assert ids[0, 4:7].tolist() == ti.token_ids and ids.shape == (1, 77)


def test_bad_placeholders_and_prompts_are_errors(base):
    stack = _fresh(base)
    with pytest.raises(ValueError, match="'cat</w>' is already a token of the tokenizer's vocabulary"):
        TextualInversion(stack.tokenizer, stack.text_encoder, "cat</w>")
    # a plain word is a token too (CLIP's vocabulary spells it "object</w>"): every prompt with it would change
    with pytest.raises(ValueError, match=r"'object' is already a token of the tokenizer's vocabulary \(id \d+\)"):
        TextualInversion(stack.tokenizer, stack.text_encoder, "object")
    TextualInversion(stack.tokenizer, stack.text_encoder, "<obj>")
    with pytest.raises(ValueError, match="'<obj>' is already a token"):
        TextualInversion(stack.tokenizer, stack.text_encoder, "<obj>")
    with pytest.raises(ValueError, match="initializer vectors have shape"):
        TextualInversion(stack.tokenizer, stack.text_encoder, "<v>", 2, initializer=torch.zeros(3, 32))
    ti = TextualInversion(stack.tokenizer, stack.text_encoder, "<long>", num_vectors=8)
    prompt = "a photo of <long> " + " ".join(["word"] * 65)  # 71 tokens as written, 78 once expanded
    with pytest.raises(ValueError, match=r"prompt 'a photo of <long> word.*' is 78 tokens long once '<long>' is "
                                         r"expanded to its 8 vectors.*limit is 77"):
        ti.input_ids(prompt)
    assert ti.input_ids("a photo of <long> " + " ".join(["word"] * 64)).shape == (1, 77)


@pytest.mark.parametrize("kind", ["sd", "ldm"])
def test_only_the_placeholder_rows_change(kind, base):
    stack = _fresh(base) if kind == "sd" else tiny_text_to_image("ldm")
    ti = TextualInversion(stack.tokenizer, stack.text_encoder, "<obj>", num_vectors=2, initializer="object")
    params = ti.freeze_text_encoder()
    before = {name: p.detach().clone() for name, p in stack.text_encoder.named_parameters()}
    table_before = ti.embedding_weight.detach().clone()
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), weight_decay=1e-2)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        latents = stack.vae.encode(images * 2 - 1).latent_dist.mean * stack.scaling_factor
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        loss = diffusion_loss(stack, latents, ti.encode(["a photo of <obj>", "a <obj>"]), generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ti.restore_frozen_rows()
    table = ti.embedding_weight.detach()
    keep = torch.ones(table.shape[0], dtype=torch.bool)
    keep[ti.token_ids] = False
    assert torch.equal(table[keep], table_before[keep])  # bit for bit, weight decay notwithstanding
    assert not torch.equal(table[ti.token_ids], table_before[ti.token_ids])
    assert (table[ti.token_ids] - table_before[ti.token_ids]).abs().sum(dim=1).min() > 0  # every vector moved
    for name, p in stack.text_encoder.named_parameters():
        if p is not ti.embedding_weight:
            assert torch.equal(p, before[name]), name


def test_diffusers_pipeline_reads_the_concept_and_encodes_the_same(base, tmp_path):
    stack = _fresh(base)
    ti = TextualInversion(stack.tokenizer, stack.text_encoder, "<tok>", num_vectors=3, initializer="object")
    optimizer = torch.optim.AdamW(ti.freeze_text_encoder(), lr=5e-2, weight_decay=1e-2)
    latents = torch.randn(1, 4, 16, 16)
    for _ in range(2):  # learned vectors that differ from each other and from the start
        optimizer.zero_grad()
        diffusion_loss(stack, latents, ti.encode("a photo of <tok>"), generator=torch.Generator()).backward()
        optimizer.step()
        ti.restore_frozen_rows()
    path = ti.save(tmp_path / "learned_embeds.safetensors")

    pipe = to_pipeline(_fresh(base))  # a clean tokenizer and text encoder
    pipe.load_textual_inversion(str(path))
    prompt = "a photo of <tok>"
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
        ours = ti.encode(prompt)
    assert pipe.maybe_convert_prompt(prompt, pipe.tokenizer) == ti.expand(prompt)
    assert theirs.shape == ours.shape == (1, 77, 32)
    assert torch.allclose(theirs, ours, atol=1e-6)
    # and our own loader reproduces the concept in a clean stack
    other = _fresh(base)
    loaded = TextualInversion.load(path, other.tokenizer, other.text_encoder)
    assert loaded.tokens == ti.tokens and torch.equal(loaded.learned_embeddings(), ti.learned_embeddings())
    with torch.no_grad():
        assert torch.allclose(loaded.encode(prompt), ours, atol=1e-6)


def test_the_concept_reaches_open_clip_through_the_shared_table(base):
    stack = _fresh(base)
    ti = TextualInversion(stack.tokenizer, stack.text_encoder, "<c>", initializer="object")
    ti.freeze_text_encoder()
    ids = ti.input_ids("a photo of <c>")
    features = encode_text_open_clip(stack.open_clip_model, ids, ti.token_embeddings(ids))
    features.sum().backward()
    grad = ti.embedding_weight.grad
    assert grad[ti.token_ids].abs().sum() > 0
    # with the learned vector equal to "object", open_clip sees the text "a photo of object"
    with torch.no_grad():
        expected = stack.open_clip_model.encode_text(stack.tokenize("a photo of object"))
    assert torch.allclose(features.detach(), expected, atol=1e-5)


def test_a_concept_of_another_width_is_refused(base, tmp_path):
    stack = _fresh(base)
    path = save_concepts(tmp_path / "wide.safetensors", {"<w>": torch.zeros(2, 1024)})
    with pytest.raises(ValueError, match=r"wide\.safetensors holds vectors of width 1024.*expects width 32"):
        TextualInversion.load(path, stack.tokenizer, stack.text_encoder)
