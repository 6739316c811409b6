"""The CLIP text side: the offline tokenizer, the SD 2.x text-encoder conversion, embedding injection, end-token
pooling of open_clip text features and concept files, each against open_clip / transformers themselves."""

from __future__ import annotations

import pytest
import torch

from anomgen.encoders.clip_text import (
    CLIP_EOT_ID,
    CLIP_VOCAB_SIZE,
    TINY_OPEN_CLIP_CONFIG,
    TINY_OPEN_CLIP_NAME,
    clip_text_model_from_open_clip,
    clip_tokenizer,
    encode_text_open_clip,
    encode_with_embeddings,
    load_concepts,
    load_open_clip,
    register_open_clip_config,
    save_concepts,
    token_embeddings,
    tokenize,
)

SENTENCES = ["a photo of a flawless bottle", "A photo of a DAMAGED screw, with a crack.", "naïve café 3 o'clock",
             "", "the    spaces\tand\nnewlines"]

#: 3 text layers, so that the conversion drops a real block and keeps two
THREE_LAYER_CLIP = {**TINY_OPEN_CLIP_CONFIG, "text_cfg": {**TINY_OPEN_CLIP_CONFIG["text_cfg"], "layers": 3}}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one thread (root conftest)."""


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def clip3():
    torch.manual_seed(0)
    return load_open_clip("anomgen-test-clip-3-layers", None, THREE_LAYER_CLIP)


@pytest.fixture(scope="module")
def text_encoder(clip3):
    return clip_text_model_from_open_clip(clip3)


def test_tokenizer_is_clip_bpe_and_matches_open_clip(tokenizer):
    import open_clip

    assert len(tokenizer) == CLIP_VOCAB_SIZE == tokenizer.vocab_size
    assert tokenizer.model_max_length == 77 and tokenizer.pad_token_id == 0
    ours = tokenize(tokenizer, SENTENCES)
    theirs = open_clip.get_tokenizer("ViT-H-14")(SENTENCES)
    assert ours.shape == (len(SENTENCES), 77)
    assert torch.equal(ours, theirs)
    # "!" is the pad token, as in SD 2.x's tokenizer: id 0 inside text too (open_clip: 256)
    assert tokenize(tokenizer, "wow!")[0, 2].item() == 0


def test_tokenize_refuses_a_prompt_that_does_not_fit(tokenizer):
    long = " ".join(["word"] * 80)
    with pytest.raises(ValueError, match=r"82 tokens long.*limit is 77"):
        tokenize(tokenizer, ["short", long])
    assert tokenize(tokenizer, " ".join(["word"] * 75)).shape == (1, 77)


def test_conversion_equals_open_clip_penultimate_block_then_ln_final(clip3, text_encoder, tokenizer):
    ids = tokenize(tokenizer, SENTENCES)
    cfg = text_encoder.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size) == (2, 32, 2, 49408)
    assert cfg.hidden_act == "gelu" and cfg.max_position_embeddings == 77
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        x = clip3.token_embedding(ids) + clip3.positional_embedding
        _, inter = clip3.transformer.forward_intermediates(x, attn_mask=clip3.attn_mask, indices=[1])
        expected = clip3.ln_final(inter[0])  # after block 2 of 3, then the final layer norm
    assert hidden.shape == (len(SENTENCES), 77, 32)
    assert torch.allclose(hidden, expected, atol=1e-5)
    # the token tables are equal (a learned vector transfers between the two)
    assert torch.equal(text_encoder.get_input_embeddings().weight, clip3.token_embedding.weight)


def test_conversion_keeping_every_block_gives_open_clips_final_tokens(clip3, tokenizer):
    full = clip_text_model_from_open_clip(clip3, drop_last_layers=0)
    ids = tokenize(tokenizer, SENTENCES[:2])
    with torch.no_grad():
        x = clip3.transformer(clip3.token_embedding(ids) + clip3.positional_embedding, attn_mask=clip3.attn_mask)
        assert torch.allclose(full(ids)[0], clip3.ln_final(x), atol=1e-5)
    with pytest.raises(ValueError, match="drop_last_layers=3"):
        clip_text_model_from_open_clip(clip3, drop_last_layers=3)


def test_encode_text_open_clip_equals_encode_text_for_ordinary_text(clip3, tokenizer):
    ids = tokenize(tokenizer, SENTENCES)
    with torch.no_grad():
        assert torch.allclose(encode_text_open_clip(clip3, ids), clip3.encode_text(ids), atol=1e-6)
        assert torch.allclose(encode_text_open_clip(clip3, ids, normalize=True),
                              clip3.encode_text(ids, normalize=True), atol=1e-6)


def test_a_learned_vector_for_an_added_id_is_used_and_gets_gradients(clip3):
    tokenizer = clip_tokenizer()
    tokenizer.add_tokens(["<concept>"])
    added = tokenizer.convert_tokens_to_ids("<concept>")
    assert added == CLIP_VOCAB_SIZE  # ≥ 49408: open_clip's argmax pooling would pick it
    ids = tokenize(tokenizer, ["a photo of a <concept> with damage"])
    position = (ids[0] == added).nonzero().item()
    vector = torch.randn(32, requires_grad=True)
    table = clip3.token_embedding.weight.detach()
    base = table[ids.clamp(max=CLIP_VOCAB_SIZE - 1)]
    embeds = torch.cat([base[:, :position], vector.view(1, 1, -1), base[:, position + 1:]], dim=1)
    features = encode_text_open_clip(clip3, ids, embeds)
    features.square().sum().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    # independent: put the vector into open_clip's own table in place of an existing id ("cat") and call encode_text
    stand_in = tokenizer.convert_tokens_to_ids("cat</w>")
    reference_ids = ids.clone()
    reference_ids[0, position] = stand_in
    original = clip3.token_embedding.weight.data[stand_in].clone()
    try:
        clip3.token_embedding.weight.data[stand_in] = vector.detach()
        with torch.no_grad():
            expected = clip3.encode_text(reference_ids)
    finally:
        clip3.token_embedding.weight.data[stand_in] = original
    assert torch.allclose(features.detach(), expected, atol=1e-6)
    # another vector gives other features
    with torch.no_grad():
        other = encode_text_open_clip(clip3, ids, torch.cat([base[:, :position], torch.randn(1, 1, 32),
                                                                base[:, position + 1:]], dim=1))
    assert not torch.allclose(other, features.detach(), atol=1e-3)
    assert (ids[0] == CLIP_EOT_ID).nonzero()[0].item() == position + 3  # pooled here, not at the added id
    with pytest.raises(ValueError, match="no end token"):
        encode_text_open_clip(clip3, torch.zeros(1, 77, dtype=torch.long))


def _clip_with_row(text_encoder, row: int, vector: torch.Tensor):
    import copy

    other = copy.deepcopy(text_encoder)
    with torch.no_grad():
        other.get_input_embeddings().weight[row] = vector
    return other


def test_encode_with_embeddings_clip_text_model(text_encoder, tokenizer):
    ids = tokenize(tokenizer, ["a photo of a cat", "a cat"])
    with torch.no_grad():
        plain = text_encoder(ids)[0]
        assert torch.equal(encode_with_embeddings(text_encoder, ids), plain)
        assert torch.allclose(encode_with_embeddings(text_encoder, ids, token_embeddings(text_encoder, ids)), plain,
                              atol=1e-6)
    # per-sample vectors: "cat" of row 0 replaced by v0, of row 1 by v1; each equals a model whose "cat" row is v_i
    cat = tokenizer.convert_tokens_to_ids("cat</w>")
    vectors = torch.randn(2, 32, requires_grad=True)
    embeds = token_embeddings(text_encoder, ids).detach()
    where = (ids == cat).unsqueeze(-1)
    embeds = torch.where(where, vectors[:, None, :].expand_as(embeds), embeds)
    hidden = encode_with_embeddings(text_encoder, ids, embeds)
    hidden.sum().backward()
    assert vectors.grad.abs().sum(dim=1).min() > 0
    for i in range(2):
        with torch.no_grad():
            expected = _clip_with_row(text_encoder, cat, vectors[i].detach())(ids[i:i + 1])[0]
        assert torch.allclose(hidden[i:i + 1].detach(), expected, atol=1e-5)
    # the hook is gone after the call
    with torch.no_grad():
        assert torch.equal(text_encoder(ids)[0], plain)
    with pytest.raises(ValueError, match="token_embeds have shape"):
        encode_with_embeddings(text_encoder, ids, embeds[:, :10])


def test_encode_with_embeddings_ldm_bert():
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel

    torch.manual_seed(0)
    bert = LDMBertModel(LDMBertConfig(vocab_size=50, d_model=16, encoder_layers=2, encoder_attention_heads=2,
                                      head_dim=8, encoder_ffn_dim=32)).eval()
    ids = torch.randint(8, 50, (2, 77))  # id 7 only at position 5
    ids[:, 5] = 7
    vector = torch.randn(16, requires_grad=True)
    embeds = token_embeddings(bert, ids).detach()
    embeds = torch.cat([embeds[:, :5], vector.expand(2, 1, 16), embeds[:, 6:]], dim=1)
    hidden = encode_with_embeddings(bert, ids, embeds)
    hidden.sum().backward()
    assert vector.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(encode_with_embeddings(bert, ids), bert(ids)[0])
        expected = _clip_with_row(bert, 7, vector.detach())(ids)[0]
    assert torch.allclose(hidden.detach(), expected, atol=1e-5)


def test_concept_files_round_trip_and_check_width(tmp_path):
    concepts = {"<flawless>": torch.randn(3, 32), "<damaged>": torch.randn(32)}
    path = save_concepts(tmp_path / "concepts.safetensors", concepts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concepts.safetensors"]  # no temporary file left
    loaded = load_concepts(path, width=32)
    assert loaded.keys() == concepts.keys()
    assert torch.equal(loaded["<flawless>"], concepts["<flawless>"])
    assert loaded["<damaged>"].shape == (1, 32) and torch.equal(loaded["<damaged>"][0], concepts["<damaged>"])
    with pytest.raises(ValueError, match=r"concepts\.safetensors holds vectors of width 32.*expects width 1024"):
        load_concepts(path, width=1024)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_concepts(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="different widths"):
        save_concepts(tmp_path / "bad.safetensors", {"a": torch.zeros(1, 4), "b": torch.zeros(1, 5)})


def test_open_clip_configs_register_once(clip3):
    import open_clip

    assert register_open_clip_config("anomgen-test-clip-3-layers", THREE_LAYER_CLIP) == "anomgen-test-clip-3-layers"
    with pytest.raises(ValueError, match="ViT-H-14.*already registered"):
        register_open_clip_config("ViT-H-14", TINY_OPEN_CLIP_CONFIG)
    model = load_open_clip(TINY_OPEN_CLIP_NAME, None, TINY_OPEN_CLIP_CONFIG)
    assert open_clip.get_model_config(TINY_OPEN_CLIP_NAME) == TINY_OPEN_CLIP_CONFIG
    assert model.token_embedding.weight.shape == (CLIP_VOCAB_SIZE, 32) and not model.training
    with pytest.raises(ValueError, match="no model config 'no-such-clip'"):
        load_open_clip("no-such-clip")
