"""model=sdedit: prompts encoded as diffusers' SD pipeline encodes them, predict_step's GeneratedBatch (prompts cycled,
settings, seed and crop box recorded, no mask), a sample the same in any batch, and the config exporting a set through
train.py on the tiny stack."""

from __future__ import annotations

import json

import pytest
import torch

PROMPTS = ["a photo of a damaged {class}", "a photo with damage"]


@pytest.fixture(scope="module")
def stack():
    from models.sdedit import build_edit_stack

    return build_edit_stack({"source": None, "prediction_type": "epsilon", "resolution": 32, "tiny": {"kind": "sd"}},
                            scheduler="DDPMScheduler")


def _model(stack, **kw):
    from models.sdedit import SDEditModel

    settings = {"prompts": PROMPTS, "num_inference_steps": 4, "strength": 0.5, "seed": 7, **kw}
    return SDEditModel(stack, **settings)


def _batch(indices, size=24):
    """A predict batch as the datamodule's collate makes it: global indices and a record batch of sources."""
    images = torch.stack([torch.rand(3, size, size, generator=torch.Generator().manual_seed(100 + i))
                          for i in indices])
    categories = ["bottle" if i % 3 else "cable" for i in indices]
    return {"index": torch.tensor(indices),
            "source": {"image": images, "label": torch.zeros(len(indices), dtype=torch.long),
                       "mask": torch.zeros(len(indices), size, size), "category": categories,
                       "image_path": [f"/data/{c}/{i:03d}.png" for c, i in zip(categories, indices)],
                       "mask_path": [""] * len(indices), "source": ["real"] * len(indices),
                       "defect_type": ["good"] * len(indices)}}


def test_encode_prompts_is_the_sd_pipelines_prompt_encoding(stack):
    from diffusers import StableDiffusionPipeline

    from models.sdedit import encode_prompts

    pipe = StableDiffusionPipeline(vae=stack.vae, text_encoder=stack.text_encoder, tokenizer=stack.tokenizer,
                                   unet=stack.unet, scheduler=stack.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    texts = ["a photo with damage", "a photo of an object with damage " * 20]  # the second one is truncated
    expected, negative = pipe.encode_prompt(texts, "cpu", 1, True, negative_prompt=["", ""])
    assert torch.equal(encode_prompts(stack, texts), expected)
    assert torch.equal(encode_prompts(stack, [""]), negative[:1])
    assert expected.shape == (2, 77, 32)


def test_predict_step_returns_the_generated_batch(stack, one_thread):
    model = _model(stack)
    assert model.trainable is False and model.generates is True
    assert model.image_size == (32, 32)  # 16 px latents × the VAE's 2× downsampling
    out = model.predict_step(_batch([0, 1, 2]), 0)
    assert out.generator == "sdedit" and len(out) == 3
    assert out.index.tolist() == [0, 1, 2] and out.label.tolist() == [1, 1, 1]
    assert out.mask is None  # SDEdit changes the whole image: no ground-truth mask
    assert out.image.shape == (3, 3, 24, 24) and 0 <= out.image.min() and out.image.max() <= 1
    assert out.category == ["cable", "bottle", "bottle"] and out.defect_type == ["sdedit"] * 3
    assert out.sources == [["/data/cable/000.png"], ["/data/bottle/001.png"], ["/data/bottle/002.png"]]
    prompts = [p["prompt"] for p in out.params]
    assert prompts == ["a photo of a damaged cable", "a photo with damage", "a photo of a damaged bottle"]
    for p in out.params:
        json.dumps(p)
        assert (p["seed"], p["strength"], p["num_inference_steps"], p["denoising_steps"]) == (7, 0.5, 4, 2)
        assert p["guidance_scale"] == 7.5 and p["negative_prompt"] == "" and p["image_size"] == [32, 32]
        assert p["scheduler"] == "DDPMScheduler" and len(p["crop_box"]) == 4
    assert len({tuple(p["crop_box"]) for p in out.params}) == 3

    # a sample does not depend on its batch (the DDPM steps draw from each sample's own generator)
    alone = model.predict_step(_batch([2]), 0)
    assert (alone.image[0] - out.image[2]).abs().max() < 1e-5 and alone.params[0] == out.params[2]
    # another seed: other draws
    other = _model(stack, seed=8).predict_step(_batch([2]), 0)
    assert (other.image[0] - out.image[2]).abs().max() > 1e-3


def test_config_exports_a_set_through_train(run_train, tmp_path):
    from anomgen.data.synthetic import SyntheticSet, read_manifest

    out = tmp_path / "set"
    metrics, _, _ = run_train(["model=sdedit", "debug=tiny", "model.num_inference_steps=4",
                               "datamodule.num_generated=3", f"synthetic_set_dir={out}"], tmp_path / "run")
    assert metrics["predict/num_exported"] == 3
    rows = read_manifest(out)
    assert [r["id"] for r in rows] == ["000000", "000001", "000002"]
    assert all(r["mask"] is None and r["label"] == 1 and r["generator"] == "sdedit" for r in rows)
    assert [r["params"]["prompt"] for r in rows] == ["a photo with damage", "a photo of an object with damage",
                                                     "a photo with damage"]
    record = SyntheticSet(out)[0]
    assert record["mask"].sum() == 0 and record["mask_path"] == ""  # no ground truth: zeros, no mask file


def test_a_concept_file_makes_its_placeholder_usable_in_prompts(tmp_path):
    """ADP's self-tuning prompts name the learned concept: the stage loads the concept file into its stack and its
    prompts encode as the concept's own encoder encodes them; a prompt that no longer fits is refused."""
    from anomgen.diffusion.text2image import tiny_text_to_image
    from anomgen.diffusion.textual_inversion import TextualInversion
    from models.sdedit import build_edit_stack, encode_prompts

    entry = {"source": None, "prediction_type": "epsilon", "resolution": 32, "tiny": {"kind": "sd"}}
    learner = tiny_text_to_image(prediction_type="epsilon")
    concept = TextualInversion(learner.tokenizer, learner.text_encoder, "<c-a>", num_vectors=2, initializer="object")
    with torch.no_grad():
        concept.embedding_weight[concept.token_ids] = torch.randn(2, learner.text_width,
                                                                  generator=torch.Generator().manual_seed(3))
    path = concept.save(tmp_path / "concept.safetensors")

    stack = build_edit_stack(entry, concept=str(path))
    prompts = ["a photo of a damaged <c-a>", "a photo of a <c-a> with damage"]
    with torch.no_grad():
        expected = concept.encode(prompts)
    assert torch.allclose(encode_prompts(stack, prompts), expected, atol=1e-6)
    plain = build_edit_stack(entry)
    assert not torch.allclose(encode_prompts(plain, prompts), expected, atol=1e-3)  # the vectors are used
    with pytest.raises(ValueError, match=r"is 78 tokens long once '<c-a>' is expanded.*limit is 77"):
        encode_prompts(stack, ["<c-a> " + "a " * 74])
