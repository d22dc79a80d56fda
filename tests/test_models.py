"""Loading users' model folders and parser weights (spec §1, §4), and refusing broken ones."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_image
from revanon_rt.errors import UsageError
from revanon_rt.masks import BISENET_FACE_LABELS, latent_mask
from revanon_rt.pixels import to_model, to_unit
from revanon_rt.reference import TorchReference


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, **changes):
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_vq_latents_are_unscaled_whatever_the_config_says(models, tmp_path):
    from diffusers import VQModel

    ldm = TorchReference(models["ldm"])
    assert "scaling_factor" not in json.loads((models["ldm"] / "vqvae" / "config.json").read_text())
    assert ldm.image_size == 64 and ldm.latent_shape == (3, 16, 16)
    x = to_model(random_image(64)[None])
    vq = VQModel.from_pretrained(models["ldm"], subfolder="vqvae").eval()
    with torch.no_grad():
        raw = vq.encode(torch.from_numpy(x)).latents.numpy()
    assert np.array_equal(ldm.encode(x), raw)
    with torch.no_grad():  # spec §1: D quantizes to the codebook first, as LDM does
        quantized = vq.decode(torch.from_numpy(raw)).sample.numpy()
        unquantized = vq.decode(torch.from_numpy(raw), force_not_quantize=True).sample.numpy()
    assert np.array_equal(ldm.decode(raw), quantized)
    assert np.abs(quantized - unquantized).max() > 1e-3, "the tiny model's codebook must move D(z) for this to test"
    scaled = _copy(models["ldm"], tmp_path / "scaled")
    _edit_json(scaled / "vqvae" / "config.json", scaling_factor=0.18215)
    assert np.array_equal(TorchReference(scaled).encode(x), raw)


def test_autoencoder_kl_uses_posterior_mean_times_scaling_factor(tmp_path):
    from diffusers import AutoencoderKL, UNet2DModel

    from revanon_rt.tiny import save_scheduler

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        scaling_factor=0.5)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                       norm_num_groups=8, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    vae.save_pretrained(tmp_path / "kl" / "vae")
    unet.save_pretrained(tmp_path / "kl" / "unet")
    save_scheduler(tmp_path / "kl")
    backend = TorchReference(tmp_path / "kl")
    assert backend.image_size == 16 and backend.latent_shape == (4, 8, 8)
    x = to_model(random_image(16)[None])
    with torch.no_grad():
        mean = vae.eval().encode(torch.from_numpy(x)).latent_dist.mean
        decoded = vae.decode(mean).sample.numpy()
    z = backend.encode(x)
    np.testing.assert_allclose(z, mean.numpy() * 0.5, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(backend.decode(z), decoded, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("breakage, message", [
    ("missing", "no such model folder"),
    ("no_unet", "no unet/ inside"),
    ("v_prediction", "needs epsilon"),
    ("learned_variance", "learns its variance"),
    ("truncated_weights", "diffusion_pytorch_model.safetensors"),
    ("bad_config", "config.json"),
    ("no_weights", "no weights"),
    ("grid_not_dividing_512", "must divide 512"),
    # the fingerprint covers every *.safetensors file: a variant beside the loaded one could hide swapped weights
    ("variant_beside", "holds diffusion_pytorch_model.fp16.safetensors besides the weights diffusers loads"),
    ("variant_only", "no diffusion_pytorch_model.safetensors"),
])
def test_broken_model_folders_are_refused_by_name(models, tmp_path, breakage, message):
    model = tmp_path / "model"
    if breakage != "missing":
        _copy(models["ldm"], model)
    if breakage == "no_unet":
        shutil.rmtree(model / "unet")
    elif breakage == "v_prediction":
        _edit_json(model / "scheduler" / "scheduler_config.json", prediction_type="v_prediction")
    elif breakage == "learned_variance":
        _edit_json(model / "unet" / "config.json", out_channels=6)
    elif breakage == "truncated_weights":
        weights = model / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:5000])
    elif breakage == "bad_config":
        (model / "unet" / "config.json").write_text("{not json")
    elif breakage == "grid_not_dividing_512":
        _edit_json(model / "unet" / "config.json", sample_size=12)
    elif breakage == "no_weights":
        (model / "vqvae" / "diffusion_pytorch_model.safetensors").unlink()
    elif breakage.startswith("variant"):
        weights = model / "unet" / "diffusion_pytorch_model.safetensors"
        shutil.copy(weights, weights.with_suffix(".fp16.safetensors"))
        if breakage == "variant_only":
            weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UsageError, match=message):
        TorchReference(model)


def test_sharded_and_bin_weights_load_with_the_fingerprint_of_the_single_file(models, tmp_path):
    """The same tensors stored as shards or as a .bin: the same model, the same fingerprint (spec §7)."""
    from diffusers import UNet2DModel

    single = TorchReference(models["ldm"])
    unet = UNet2DModel.from_pretrained(models["ldm"], subfolder="unet")
    for name, save in (("sharded", {"max_shard_size": "20KB"}), ("bin", {"safe_serialization": False})):
        model = _copy(models["ldm"], tmp_path / name)
        shutil.rmtree(model / "unet")
        unet.save_pretrained(model / "unet", **save)
        assert len(list((model / "unet").glob("*.safetensors"))) > (3 if name == "sharded" else -1)
        other = TorchReference(model)
        assert other.fingerprint == single.fingerprint
        z = np.random.default_rng(0).standard_normal((1, *single.latent_shape)).astype(np.float32)
        np.testing.assert_array_equal(other.eps(z, 500), single.eps(z, 500))


def test_bisenet_face_map_matches_facexlib_by_hand(models, bisenet_pth):
    from facexlib.parsing.bisenet import BiSeNet

    backend = TorchReference(models["ldm"], parser=bisenet_pth)
    rgb = random_image(64, seed=4)[None]
    face_map = backend.parse(to_unit(rgb))
    net = BiSeNet(num_class=19)
    net.load_state_dict(torch.load(bisenet_pth, weights_only=True))
    net.eval()
    with torch.no_grad():
        x = torch.from_numpy(rgb).permute(0, 3, 1, 2).contiguous().float() / 255
        x = F.interpolate(x, size=(512, 512), mode="bilinear", align_corners=False)
        x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        labels = net(x)[0].argmax(1).numpy()
    expected = np.isin(labels, BISENET_FACE_LABELS).astype(np.uint8)
    assert face_map.shape == (1, 512, 512) and face_map.dtype == np.uint8
    assert np.array_equal(face_map, expected)
    m = latent_mask(face_map[0], (16, 16))
    assert np.array_equal(m, expected[0].reshape(16, 32, 16, 32).max(axis=(1, 3)))


def test_bad_parser_weights_are_refused(models, tmp_path):
    with pytest.raises(UsageError, match="no such BiSeNet"):
        TorchReference(models["zero"], parser=tmp_path / "nope.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"weight": torch.zeros(3)}, wrong)
    with pytest.raises(UsageError, match="wrong.pth: not facexlib BiSeNet"):
        TorchReference(models["zero"], parser=wrong)
    key = tmp_path / "my.key"
    key.write_text("00" * 32 + "\n")
    with pytest.raises(UsageError) as refused:
        TorchReference(models["zero"], parser=key)
    message = str(refused.value)
    assert "not a PyTorch file of tensors" in message and "weights_only" not in message and "\n" not in message
