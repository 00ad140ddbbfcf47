"""Text-conditioned latent priors (SD-Turbo / SDXL-Turbo family): conditioner, builtins, save/load, and
regeneration that equals diffusers' own img2img pipelines."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DConditionModel

from ddcodec.bundle.manifest import derive_seed
from ddcodec.errors import GeneratorError
from ddcodec.generators import load_prior
from ddcodec.generators.pipelines import PIPELINES, cpu_deterministic
from ddcodec.generators.text import build_text_prior, stock_pipeline
from ddcodec.generators.text_configs import (byte_level_clip_tokenizer, sd15_config, sd_turbo_config,
                                             sdxl_turbo_config)

SD, SDXL = "builtin:tiny-sd-turbo", "builtin:tiny-sdxl-turbo"
PROMPTS = ["a photo of a cat", "a photo of a dog", "a photo of a ship"]


@pytest.fixture(scope="module")
def priors():
    return {name: load_prior(name) for name in (SD, SDXL)}


@pytest.fixture(scope="module")
def saved(priors, tmp_path_factory):
    out = {}
    for name, prior in priors.items():
        out[name] = tmp_path_factory.mktemp(name.split(":")[1])
        prior.save_pretrained(out[name])
    return out


def test_offline_clip_tokenizer():
    tok = byte_level_clip_tokenizer(pad_token="!")
    assert len(tok) == 514 and (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (512, 513, 0)
    ids = tok(["a cat", "x " * 200], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (2, 77)
    assert tok.convert_ids_to_tokens(ids[0, :6].tolist()) == ["<|startoftext|>", "a</w>", "c", "a", "t</w>", "<|endoftext|>"]
    assert ids[1, -1] == 513, "truncated prompts still end with <|endoftext|>"


def test_builtins_load_lazily_and_are_seeded(priors):
    for name in (SD, SDXL):
        again = load_prior(name, num_classes=10)
        assert again.kind == "text" and again.source == name
        assert set(again.component_hashes()) == {"conditioner", "unet", "vae"}
        assert again.component_hashes() == priors[name].component_hashes()
    assert priors[SD].component_hashes()["unet"] != priors[SDXL].component_hashes()["unet"]
    c = priors[SDXL].conditioner  # keys without 'text_model.' (stable across transformers 4/5), still loadable
    assert not any("text_model." in k for k in c.state_dict()) and any(k.startswith("text_encoder_2.") for k in c.state_dict())
    assert not c.load_state_dict(c.state_dict()).missing_keys
    with pytest.raises(GeneratorError, match="unknown builtin generator"):
        load_prior("builtin:tiny-sd-nope")


@pytest.fixture
def no_onednn():
    """Encode as the conditioner does on CPU (oneDNN off), so diffusers' encode_prompt is comparable bit for bit."""
    with cpu_deterministic("cpu"):
        yield


def test_sd_conditioner_matches_diffusers_encode_prompt(priors, no_onednn):
    prior = priors[SD]
    c = prior.conditioner
    pipe = stock_pipeline(prior, img2img=False)
    for prompt in PROMPTS[:2]:
        pos, neg = pipe.encode_prompt([prompt], "cpu", 1, True)
        assert torch.equal(c.condition(torch.tensor([0]), [prompt])["encoder_hidden_states"], pos)
        assert torch.equal(c.null_condition(1)["encoder_hidden_states"], neg)
    _, neg = pipe.encode_prompt(["x"], "cpu", 1, True, negative_prompt=["blurry"])
    assert torch.equal(c.null_condition(1, "blurry")["encoder_hidden_states"], neg)
    kw = c.condition(torch.tensor([0, 1, 0]), [PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert set(kw) == {"encoder_hidden_states"} and kw["encoder_hidden_states"].shape == (3, 77, 32)
    assert c.embed(PROMPTS[0]) is c.embed(PROMPTS[0]), "embeddings are cached per prompt"


def test_cached_embeddings_do_not_depend_on_the_callers_onednn_setting():
    fresh = load_prior(SD).conditioner
    with cpu_deterministic("cpu"):
        a = fresh.embed(PROMPTS[0])[0].clone()
    fresh._cache.clear()
    assert torch.equal(fresh.embed(PROMPTS[0])[0], a)


def test_sdxl_conditioner_matches_diffusers_encode_prompt(priors, no_onednn):
    prior = priors[SDXL]
    c = prior.conditioner
    pipe = stock_pipeline(prior, img2img=False)
    pos, neg, pooled, neg_pooled = pipe.encode_prompt([PROMPTS[0]], device="cpu", do_classifier_free_guidance=True)
    kw = c.condition(torch.tensor([0]), [PROMPTS[0]], image_size=(48, 32))
    assert torch.equal(kw["encoder_hidden_states"], pos) and pos.shape == (1, 77, 64)
    assert torch.equal(kw["added_cond_kwargs"]["text_embeds"], pooled)
    assert kw["added_cond_kwargs"]["time_ids"].tolist() == [[48, 32, 0, 0, 48, 32]]
    null = c.null_condition(1)  # force_zeros_for_empty_prompt, as SDXL(-Turbo) ships
    assert torch.equal(null["encoder_hidden_states"], neg) and not neg.any()
    assert torch.equal(null["added_cond_kwargs"]["text_embeds"], neg_pooled)
    _, neg, _, neg_pooled = pipe.encode_prompt([PROMPTS[0]], device="cpu", do_classifier_free_guidance=True,
                                               negative_prompt=["blurry"])
    null = c.null_condition(2, "blurry")
    assert torch.equal(null["encoder_hidden_states"][1:], neg) and neg.any()
    assert torch.equal(null["added_cond_kwargs"]["text_embeds"][1:], neg_pooled)
    assert c.condition(torch.tensor([0]), ["a"])["added_cond_kwargs"]["time_ids"][0, 0] == 32, "default: native size"


@pytest.mark.parametrize("name", [SD, SDXL])
def test_save_pretrained_round_trip_in_diffusers_layout(name, priors, saved):
    path, prior = saved[name], priors[name]
    index = json.loads((path / "model_index.json").read_text())
    xl = name == SDXL
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline")
    parts = {"vae", "unet", "scheduler", "text_encoder", "tokenizer"} | ({"text_encoder_2", "tokenizer_2"} if xl else set())
    assert {k for k, v in index.items() if isinstance(v, list) and v[0]} == parts
    weights = sorted(p.name for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".pkl", ".ckpt"))
    assert weights and all(w.endswith(".safetensors") for w in weights)
    back = load_prior(str(path))
    assert back.kind == "text" and back.component_hashes() == prior.component_hashes()
    assert back.scheduler_spec() == prior.scheduler_spec()
    a, b = back.conditioner.condition(torch.tensor([0]), PROMPTS[:1]), prior.conditioner.condition(torch.tensor([0]), PROMPTS[:1])
    assert torch.equal(a["encoder_hidden_states"], b["encoder_hidden_states"])
    # the layout is diffusers' own: its pipeline loader accepts the directory as is
    pipe = DiffusionPipeline.from_pretrained(str(path), use_safetensors=True)
    assert type(pipe).__name__ == index["_class_name"]


def test_load_errors_are_one_line(saved, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(saved[SD], bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "text_encoder": ["transformers", "T5EncoderModel"]}))
    with pytest.raises(GeneratorError, match="T5EncoderModel") as e:
        load_prior(str(bad))
    assert "\n" not in str(e.value)
    (bad / "model_index.json").write_text(json.dumps(index))
    (bad / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(GeneratorError, match="text_encoder") as e:
        load_prior(str(bad))
    assert "\n" not in str(e.value)


def regenerate(prior, guidance: float, micro_batch: int, seed: int = 7, variant: int = 1, steps: int = 4,
               strength: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(ddcodec img2img of 2 stored latents, diffusers img2img of the same latents called once per image)."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    items = {"latents": latents, "class_ids": torch.tensor([2, 0])}
    params = {"steps": steps, "strength": strength, "guidance_scale": guidance}
    extra = {"negative_prompt": "blurry"} if guidance > 1 else {}
    spec = {"params": {**params, **extra}, "scheduler": prior.scheduler_spec(), "dtype": "float32"}
    ours = PIPELINES["img2img"](prior, spec, items, PROMPTS, seed, (16, 16), micro_batch=micro_batch)([0, 1], variant)
    ref = stock_pipeline(prior)
    ref.set_progress_bar_config(disable=True)
    theirs = []
    with cpu_deterministic("cpu"):  # as the ddcodec pipeline runs on CPU
        for i in range(2):
            gen = torch.Generator("cpu").manual_seed(derive_seed(seed, i, variant, "noise"))
            theirs.append(ref(prompt=PROMPTS[int(items["class_ids"][i])], image=latents[i:i + 1], strength=strength,
                              num_inference_steps=steps, guidance_scale=guidance, generator=gen, output_type="pt",
                              **extra).images)
    return ours, torch.cat(theirs)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_sd_turbo_img2img_equals_diffusers_pipeline(priors, guidance):
    ours, theirs = regenerate(priors[SD], guidance, micro_batch=1)
    assert ours.shape == theirs.shape == (2, 3, 16, 16)
    assert torch.equal(ours, theirs), "per-image micro-batches reproduce diffusers bit for bit"
    batched, _ = regenerate(priors[SD], guidance, micro_batch=2)
    # batching changes only GEMM/conv blocking, i.e. float rounding
    torch.testing.assert_close(batched, theirs, atol=1e-5, rtol=0)


def test_sdxl_turbo_img2img_equals_diffusers_pipeline(priors):
    ours, theirs = regenerate(priors[SDXL], guidance=2.0, micro_batch=1)  # CFG: zeroed null embeddings, time_ids
    assert torch.equal(ours, theirs)


def test_float16_sdxl_vae_decodes_in_float32_like_diffusers():
    """SDXL's VAE asks for float32 (force_upcast), which diffusers' SDXL pipelines honour: so does the prior,
    and only for the block; an SD-style prior in float16 decodes in float16, as diffusers' SD pipelines do."""
    import copy
    xl = load_prior(SDXL).to("cpu", torch.float16)
    assert xl.vae.config.force_upcast and xl.vae_upcast()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref_vae = copy.deepcopy(xl.vae).float()
    ref = ((ref_vae.decode(z / xl.scaling_factor).sample + 1) / 2).clamp(0, 1)
    assert torch.equal(xl.decode(z), ref)
    assert next(xl.vae.parameters()).dtype == torch.float16, "the VAE goes back to float16 afterwards"
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    latents = xl.encode(images)
    assert latents.dtype == torch.float16
    assert torch.equal(latents, (ref_vae.encode(images * 2 - 1).latent_dist.mean * xl.scaling_factor).half())
    sd = load_prior(SD).to("cpu", torch.float16)
    assert sd.vae.config.force_upcast and not sd.vae_upcast()
    assert not load_prior(SDXL).vae_upcast(), "float32 priors need no upcast"


def test_sdxl_size_ids_follow_the_latents(priors):
    items = {"latents": torch.zeros(1, 4, 12, 10), "class_ids": torch.tensor([0])}
    spec = {"params": {}, "scheduler": priors[SDXL].scheduler_spec(), "dtype": "float32"}
    pipe = PIPELINES["img2img"](priors[SDXL], spec, items, PROMPTS, 0, (32, 32), micro_batch=1)
    assert pipe.size_kwargs() == {"image_size": (24, 20)}
    assert pipe.condition([0])["added_cond_kwargs"]["time_ids"].tolist() == [[24, 20, 0, 0, 24, 20]]


@pytest.mark.parametrize("config, unet_m, text_m", [(sd_turbo_config, 865.9, [340.4]), (sd15_config, 859.5, [123.1]),
                                                    (sdxl_turbo_config, 2567.5, [123.1, 694.7])])
def test_full_size_configs_on_meta(config, unet_m, text_m):
    prior = build_text_prior(config(), device="meta")
    millions = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    assert all(p.is_meta for p in prior.unet.parameters())
    assert millions(prior.unet) == pytest.approx(unet_m, abs=0.1)
    assert millions(prior.vae) == pytest.approx(83.65, abs=0.1)
    assert [round(millions(e), 1) for e in prior.conditioner.encoders] == pytest.approx(text_m, abs=0.1)
    assert isinstance(prior.unet, UNet2DConditionModel) and prior.conditioner.text_time == (config is sdxl_turbo_config)
