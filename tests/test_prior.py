"""`ddcodec prior`: a tiny training run writes a loadable prior, checkpoints resume exactly, the default prior decodes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ddcodec.errors import DDCodecError
from ddcodec.generators.prior import (DEFAULT_PRIOR, SHIPPED_PRIORS, load_prior, resolve_source, trained_classes,
                                      trained_size)
from ddcodec.prior.config import PriorConfig
from ddcodec.prior.data import ImageSet
from ddcodec.prior.evaluate import img2img
from ddcodec.prior.train import psnr, train_prior

SHARED = Path(os.environ.get("DDCODEC_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
R20 = SHARED / "models" / "cifar10_resnet20.safetensors"

TINY = dict(vae_channels=[16, 32], unet_channels=[32, 32], unet_attention=[False, True], context_dim=32,
            vae_steps=2, unet_steps=2, decoder_steps=2, batch_size=4, unet_batch_size=4, holdout=4, warmup=1)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and the machine may be shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_data(n: int = 24, classes: int = 3, size: int = 16) -> ImageSet:
    """Smooth random images: a 4x4 colour pattern upsampled, so there is something to reconstruct."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    images = (torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear") * 255).round().to(torch.uint8)
    return ImageSet(images, torch.arange(n) % classes, [f"c{i}" for i in range(classes)])


def states(path: Path) -> dict[str, torch.Tensor]:
    p = load_prior(str(path))
    return {f"{n}.{k}": v for n, m in p.modules().items() for k, v in m.state_dict().items()}


def test_tiny_run_writes_a_loadable_prior(tmp_path):
    cfg = PriorConfig(image_size=16, **TINY)
    record = train_prior(cfg, tiny_data(), tmp_path / "p", progress=False, log=lambda s: None)
    assert record["latent_shape"] == [4, 8, 8] and record["train_images"] == 21
    assert not (tmp_path / "p.ckpt").exists(), "the checkpoint is removed once the prior is written"
    prior = load_prior(str(tmp_path / "p"))
    assert prior.kind == "class" and prior.scheduler.config.prediction_type == "v_prediction"
    assert prior.scaling_factor == pytest.approx(record["scaling_factor"])
    assert all(p.dtype == torch.float32 for m in prior.modules().values() for p in m.parameters())
    # round trip: save_pretrained again, load again, same weights
    prior.save_pretrained(tmp_path / "q")
    a, b = states(tmp_path / "p"), states(tmp_path / "q")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # images through the regeneration pipeline: decode-only, img2img and pure sampling
    data = tiny_data(6)
    items = {"class_ids": data.labels, "pixels": data.images}
    for strength, its, guidance in [(0.0, items, 1.0), (0.5, items, 2.0), (1.0, {"class_ids": data.labels}, 2.0)]:
        out = img2img(prior, its, 3, 16, strength, 4, guidance, seed=1, micro_batch=4)(list(range(6)), 0)
        assert out.shape == (6, 3, 16, 16) and torch.isfinite(out).all() and 0 <= out.min() <= out.max() <= 1


def test_checkpoint_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = PriorConfig(image_size=16, **TINY)
    quiet = dict(progress=False, log=lambda s: None)
    train_prior(cfg, tiny_data(), tmp_path / "full", checkpoint_every=1, **quiet)
    assert train_prior(cfg, tiny_data(), tmp_path / "cut", stop_after=3, **quiet) is None  # inside the denoiser stage
    assert (tmp_path / "cut.ckpt" / "state.json").exists() and not (tmp_path / "cut").exists()
    meta = json.loads((tmp_path / "cut.ckpt" / "state.json").read_text())
    assert (meta["state"]["stage"], meta["state"]["step"]) == ("unet", 1)
    with pytest.raises(DDCodecError, match="--resume"):
        train_prior(cfg, tiny_data(), tmp_path / "cut", **quiet)
    with pytest.raises(DDCodecError, match="different settings"):
        train_prior(PriorConfig(image_size=16, **{**TINY, "unet_lr": 1e-2}), tiny_data(), tmp_path / "cut", resume=True, **quiet)
    train_prior(cfg, tiny_data(), tmp_path / "cut", resume=True, **quiet)
    a, b = states(tmp_path / "full"), states(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"


def test_vae_from_keeps_that_vae_and_trains_only_the_denoiser(tmp_path):
    quiet = dict(progress=False, log=lambda s: None)
    train_prior(PriorConfig(image_size=16, **TINY), tiny_data(), tmp_path / "first", **quiet)
    # the new prior's own VAE fields say otherwise: they are read from the source VAE
    cfg = PriorConfig(image_size=16, **{**TINY, "vae_channels": [8, 8, 8], "vae_steps": 0, "decoder_steps": 0,
                                        "unet_steps": 3}, vae_from=str(tmp_path / "first"))
    record = train_prior(cfg, tiny_data(), tmp_path / "second", **quiet)
    assert record["config"]["vae_channels"] == [16, 32] and record["latent_shape"] == [4, 8, 8]
    a, b = states(tmp_path / "first"), states(tmp_path / "second")
    vae = [k for k in a if k.startswith("vae.")]
    assert vae and all(torch.equal(a[k], b[k]) for k in vae), "the source VAE is kept as it is"
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("unet."))
    assert load_prior(str(tmp_path / "second")).scaling_factor == pytest.approx(load_prior(str(tmp_path / "first")).scaling_factor)
    assert any(e.get("stage") == "vae" and e.get("step") == 0 and "holdout_psnr" in e for e in record["log"])


def test_cli_train_and_eval(tmp_path, cifar_folder):
    if not R20.exists():
        pytest.skip("shared teacher weights not found")
    from ddcodec.cli import main
    out = tmp_path / "prior"
    args = ["prior", "train", "--data", str(cifar_folder), "--out", str(out), "--image-size", "16", "--vae-channels", "16,32",
            "--unet-channels", "32,32", "--unet-attention", "0,1", "--context-dim", "32", "--vae-steps", "2",
            "--unet-steps", "1", "--batch-size", "4", "--unet-batch-size", "4", "--holdout", "10",
            "--feature-net", "cifar10-resnet20", "--save-dtype", "float16"]
    assert main(args) == 0
    assert main(args) == 2, "refuses to overwrite without --overwrite"
    assert json.loads((out / "vae" / "config.json").read_text())["scaling_factor"] > 0
    res = tmp_path / "eval.json"
    assert main(["prior", "eval", str(out), "--data", str(cifar_folder), "--teacher", "cifar10-resnet20", "--limit", "10",
                 "--steps", "2", "--samples-per-class", "1", "--guidance", "1,2", "--json", str(res)]) == 0
    r = json.loads(res.read_text())
    assert r["n_images"] == 10 and set(r["acc_samples"]) == {"1.0", "2.0"} and r["vae_psnr_db"] > 0
    assert trained_size(load_prior(str(out))) == 16 and r["image_size"] == 16, "eval resizes the 32 px data to the prior's size"
    assert main(["prior", "eval", str(out), "--data", str(cifar_folder), "--split", "holdout", "--teacher",
                 "cifar10-resnet20", "--steps", "2", "--samples-per-class", "0"]) == 0


def test_bad_config_is_a_one_line_error(tmp_path):
    with pytest.raises(DDCodecError, match="divisible"):
        train_prior(PriorConfig(image_size=30), tiny_data(), tmp_path / "x", progress=False)


@pytest.mark.skipif(not (DEFAULT_PRIOR / "model_index.json").exists(), reason="default prior not shipped")
def test_default_prior_loads_and_decodes():
    prior = load_prior("builtin:default")
    size = sum(f.stat().st_size for f in DEFAULT_PRIOR.rglob("*") if f.is_file())
    assert size <= 20 * 1024 * 1024
    assert all(p.dtype == torch.float32 for m in prior.modules().values() for p in m.parameters())
    # real CIFAR-10 test images from the shipped sample survive encode/decode (20.3 dB measured on the test split)
    from ddcodec.prior.data import load_images
    x = load_images("sample:cifar10", "test", limit=20).images.float() / 255
    z = prior.encode(x)
    assert z.shape == (20, 4, 16, 16)
    assert psnr(prior.decode(z), x) > 18


V2 = SHIPPED_PRIORS["builtin:cifar10-v2"]


@pytest.mark.skipif(not (V2 / "model_index.json").exists(), reason="builtin:cifar10-v2 not shipped")
def test_cifar10_v2_shares_the_default_vae_and_keeps_its_name():
    v1, v2 = load_prior("builtin:default"), load_prior("builtin:cifar10-v2")
    assert v2.source == "builtin:cifar10-v2" and resolve_source("builtin:cifar10-v2") == str(V2)
    size = sum(f.stat().st_size for f in V2.rglob("*") if f.is_file())
    assert size <= 20 * 1024 * 1024
    # same latent space, so a bundle's decode-only items look the same under either; only the denoiser was retrained
    h1, h2 = v1.component_hashes(), v2.component_hashes()
    assert h1["vae"] == h2["vae"] and h1["unet"] != h2["unet"]
    assert v1.scaling_factor == pytest.approx(v2.scaling_factor, rel=1e-3)
    assert trained_classes(v2) == trained_classes(v1)


@pytest.mark.skipif(not (V2 / "model_index.json").exists(), reason="builtin:cifar10-v2 not shipped")
def test_a_random_bundle_renders_the_same_under_either_shipped_prior(tmp_path):
    """Decode-only bundles see only the VAE, so the random baseline is the same images under both priors."""
    from ddcodec import DistilledDataset
    from ddcodec.methods.random_subset import encode_random
    images = {}
    for name in ("builtin:default", "builtin:cifar10-v2"):
        out = tmp_path / name.split(":")[1]
        bundle = encode_random("sample:cifar10", 2, out, seed=0, generator=name)
        assert bundle.manifest["generator"]["model"]["source"] == name
        images[name] = DistilledDataset(str(out)).regenerate(torch.arange(20), 0)
    assert torch.equal(images["builtin:default"], images["builtin:cifar10-v2"])


IN64 = SHIPPED_PRIORS["builtin:imagenette-64"]


@pytest.mark.skipif(not (IN64 / "model_index.json").exists(), reason="builtin:imagenette-64 not shipped")
def test_imagenette_64_shares_the_default_vae_and_draws_imagenette_classes():
    from ddcodec.generators.prior import check_prior_classes
    base, prior = load_prior("builtin:default"), load_prior("builtin:imagenette-64")
    assert sum(f.stat().st_size for f in IN64.rglob("*") if f.is_file()) <= 12 * 1024 * 1024  # its denoiser is float16
    assert all(p.dtype == torch.float32 for m in prior.modules().values() for p in m.parameters())  # runs in float32
    assert base.component_hashes()["vae"] == prior.component_hashes()["vae"]
    assert trained_size(prior) == 64
    names = trained_classes(prior)
    assert len(names) == 10 and names[0] == "n01440764"
    check_prior_classes(prior, ["tench", "English springer", "cassette player", "chain saw", "church", "French horn",
                                "garbage truck", "gas pump", "golf ball", "parachute"])
    with pytest.raises(DDCodecError, match="classes it was trained on"):
        check_prior_classes(prior, trained_classes(base))
    ids = torch.tensor([0, 9])
    out = img2img(prior, {"class_ids": ids}, 10, 64, 1.0, 2, 4.0, 0, 2)([0, 1], 0)
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()


def test_unknown_builtin_names_the_shipped_priors():
    with pytest.raises(DDCodecError, match="builtin:cifar10-v2"):
        load_prior("builtin:nope")
