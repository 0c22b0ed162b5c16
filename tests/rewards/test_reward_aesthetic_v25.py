"""Aesthetic Predictor v2.5 (``reward.kind=aesthetic-v25``) on a tiny random-weight SigLIP, offline.

* Preprocessing: our differentiable squash resize + mean/std 0.5 against transformers' ``SiglipImageProcessorPil``
  (the PIL backend of ``SiglipImageProcessor``, what the upstream predictor runs) on real images, square and not.
* The score: a hand-written forward (``SiglipVisionModel.pooler_output`` -> L2 normalisation -> the five Linear
  layers applied straight from the upstream-named state dict) gives the same scores.
* Gradients reach the images and never the reward weights; bad head files and backbones fail in one line; the config
  builds it and refuses SRPO's relative forms (image-only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from directalign.config import build_config
from directalign.engine.config import ConfigError
from directalign.methods.registry import METHODS
from directalign.rewards.registry import RewardError
from directalign.rewards.registry import load_reward as load_reward_section
from directalign.rewards import preprocess as pp
from directalign.rewards.aesthetic_v25 import HEAD_KEYS, AestheticV25Reward, load_head
from directalign.rewards.relative import semantic_relative_reward
from directalign.rewards.weighted import WeightedSumReward
from directalign.rewards.zoo import REWARD_KINDS, build_reward, reward_from_config
from image_helpers import real_images, to_pil

PROMPTS = ["a red circle on a blue background", "a green square on a yellow background"]
CPU = torch.device("cpu")


def load_reward(cfg, device):
    """The run's reward as training loads it: the registry's loader, checked against the method's held-out form."""
    return load_reward_section(cfg.reward, device, METHODS[cfg.method].held_out_form(cfg)[0])
WIDTH = 32  # the tiny SigLIP's hidden size (1152 for so400m)
SIZE = 384  # as google/siglip-so400m-patch14-384


# ============================================================================================ real images
def siglip_processor(size: int = SIZE):
    """transformers' SigLIP image processor with google/siglip-so400m-patch14-384's preprocessor_config.json values
    (PIL backend: the default torchvision backend needs torchvision, which this environment does not have)."""
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(do_resize=True, size={"height": size, "width": size}, resample=3, do_rescale=True,
                                   rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5, 0.5, 0.5],
                                   image_std=[0.5, 0.5, 0.5])


def ref_siglip(images: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    proc = siglip_processor(size)
    out = proc(images=[to_pil(img) for img in images], return_tensors="np").pixel_values
    return torch.as_tensor(np.asarray(out))


# ============================================================================================ preprocessing
# Tolerance in pixel units of [0, 1] images (the normalised difference times SigLIP's std 0.5), as for the CLIP
# processors in test_reward_zoo.py: PIL resamples in 8-bit fixed point and rounds to 8 bits, the kernel is the same.
# Measured on these images: max 1.06/255, mean 0.08/255; exact (1e-6) at 384 x 384, where nothing is resized.
MAX_TOL = 1.5 / 255
MEAN_TOL = 0.25 / 255
SHAPES = [(384, 384), (256, 256), (240, 320), (336, 200), (32, 32), (720, 720), (480, 854)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_differentiable_preprocessing_matches_siglip_image_processor(shape):
    images = real_images(*shape)
    ours = pp.published_preprocess(images, SIZE, "squash", pp.SIGLIP_MEAN, pp.SIGLIP_STD)
    ref = ref_siglip(images)
    assert ours.shape == ref.shape == (3, 3, SIZE, SIZE)
    diff = ((ours - ref) * 0.5).abs()
    assert float(diff.mean()) < MEAN_TOL, float(diff.mean()) * 255
    assert float(diff.max()) < MAX_TOL, float(diff.max()) * 255
    if shape == (SIZE, SIZE):  # no resize at all: only the 8-bit rescale and the normalisation
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_squash_keeps_the_whole_image_and_is_differentiable():
    images = real_images(240, 320, n=1).requires_grad_(True)
    out = pp.published_preprocess(images, SIZE, "squash", pp.SIGLIP_MEAN, pp.SIGLIP_STD)
    assert out.shape == (1, 3, SIZE, SIZE) and float(out.detach().min()) >= -1 and float(out.detach().max()) <= 1
    out.sum().backward()
    assert images.grad is not None and (images.grad != 0).float().mean() > 0.99  # every pixel is used: no crop


# ============================================================================================ tiny SigLIP + head
def tiny_vision_config(**overrides):
    from transformers import SiglipVisionConfig

    kwargs = dict(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=SIZE, patch_size=48, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    kwargs.update(overrides)
    return SiglipVisionConfig(**kwargs)


def upstream_head_state_dict(width: int = WIDTH, seed: int = 5, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A random head with the upstream file's key names and layout (bfloat16, as aesthetic_predictor_v2_5.pth)."""
    g = torch.Generator().manual_seed(seed)
    sd, fan_in = {}, width
    for i, out in zip((0, 2, 4, 6, 8), (1024, 128, 64, 16, 1)):
        sd[f"scoring_head.{i}.weight"] = (torch.randn(out, fan_in, generator=g) * fan_in**-0.5).to(dtype)
        sd[f"scoring_head.{i}.bias"] = (torch.randn(out, generator=g) * 0.1).to(dtype)
        fan_in = out
    return sd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SiglipVisionModel dir, a tiny full SiglipModel dir (the layout of google/siglip-so400m-patch14-384),
    and the head as torch.save'd .pth and as .safetensors."""
    from safetensors.torch import save_file
    from transformers import SiglipConfig, SiglipModel, SiglipVisionModel

    root = tmp_path_factory.mktemp("aesthetic-v25")
    torch.manual_seed(0)
    SiglipVisionModel(tiny_vision_config()).save_pretrained(root / "siglip-vision")
    full = SiglipConfig(text_config=dict(vocab_size=64, hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=16),
                        vision_config=tiny_vision_config().to_dict())
    SiglipModel(full).save_pretrained(root / "siglip-full")
    sd = upstream_head_state_dict()
    torch.save(sd, root / "aesthetic_predictor_v2_5.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "head.safetensors"))
    return root, sd


def reference_scores(vision, sd: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """Upstream's forward written out: pooled SigLIP output, divided by its norm, then the Linear layers in order
    (dropouts are identities in eval mode), straight from the state dict."""
    with torch.no_grad():
        x = vision(pixel_values=pixels).pooler_output
        x = x / x.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 8):
            x = F.linear(x, sd[f"scoring_head.{i}.weight"].float(), sd[f"scoring_head.{i}.bias"].float())
    return x.squeeze(-1)


@pytest.mark.parametrize("head_file", ["aesthetic_predictor_v2_5.pth", "head.safetensors"])
def test_score_is_the_upstream_forward(files, head_file):
    root, sd = files
    reward = AestheticV25Reward.from_pretrained(root / head_file, root / "siglip-vision")
    assert not reward.text_conditioned and reward.image_size == SIZE and not reward.training
    images = real_images(SIZE, SIZE, n=3)
    pixels = images * 2 - 1  # 384 x 384: the processor only rescales and normalises (mean = std = 0.5)
    expected = reference_scores(reward.vision, sd, pixels)
    with torch.no_grad():
        got = reward(images, PROMPTS + ["ignored"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert float(expected.max() - expected.min()) > 1e-4  # the images get different scores
    with torch.no_grad():
        halved = AestheticV25Reward(reward.vision, reward.head, divisor=2.0)(images, PROMPTS + ["x"])
    torch.testing.assert_close(halved, expected / 2, rtol=1e-5, atol=1e-5)


def test_score_of_non_square_images_follows_the_published_pipeline(files):
    """The whole pipeline against SiglipImageProcessor (PIL) + the reference forward, on photo-sized images."""
    root, sd = files
    reward = AestheticV25Reward.from_pretrained(root / "aesthetic_predictor_v2_5.pth", root / "siglip-vision")
    images = real_images(480, 854, n=2)
    with torch.no_grad():
        got = reward(images, PROMPTS)
        exact = reward.score_texts(reward.encode_images(images), ["a", "b"])
    expected = reference_scores(reward.vision, sd, ref_siglip(images))
    torch.testing.assert_close(exact, got)
    assert float((got - expected).abs().max()) < 0.02 * float(expected.abs().max()) + 1e-3


def test_a_full_siglip_checkpoint_loads_its_vision_tower(files):
    """google/siglip-so400m-patch14-384 is a full SiglipModel: only its vision tower is loaded, with its weights."""
    from transformers import SiglipModel

    root, sd = files
    reward = AestheticV25Reward.from_pretrained(root / "head.safetensors", root / "siglip-full")
    full = SiglipModel.from_pretrained(root / "siglip-full").eval()
    images = real_images(SIZE, SIZE, n=2)
    with torch.no_grad():
        pooled = full.vision_model(pixel_values=images * 2 - 1).pooler_output
        x = pooled / pooled.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 8):
            x = F.linear(x, sd[f"scoring_head.{i}.weight"].float(), sd[f"scoring_head.{i}.bias"].float())
        torch.testing.assert_close(reward(images, PROMPTS), x.squeeze(-1), rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_images_and_not_the_weights(files):
    root, _ = files
    reward = AestheticV25Reward.from_pretrained(root / "aesthetic_predictor_v2_5.pth", root / "siglip-vision")
    images = real_images(64, 96, n=2).requires_grad_(True)
    scores = reward(images, PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in reward.parameters())
    assert not reward.training


def test_the_head_keeps_the_upstream_key_names(files):
    root, sd = files
    head = load_head(root / "aesthetic_predictor_v2_5.pth")
    assert sorted(head.state_dict()) == sorted(HEAD_KEYS) == sorted(sd)
    assert head.input_size == WIDTH and head.scoring_head[0].weight.dtype == torch.float32
    # nested as in the upstream model (AestheticPredictorV2_5Model.layers): the prefix is stripped
    torch.save({f"layers.{k}": v for k, v in sd.items()}, root / "nested.pth")
    torch.testing.assert_close(load_head(root / "nested.pth").state_dict(), head.state_dict())


# ============================================================================================ bad files
def test_a_missing_head_file_is_named(files, tmp_path):
    root, _ = files
    with pytest.raises(FileNotFoundError, match="does not exist.*aesthetic_predictor_v2_5.pth"):
        AestheticV25Reward.from_pretrained(tmp_path / "nothing.pth", root / "siglip-vision")


def test_a_head_with_other_keys_is_refused(files, tmp_path):
    root, sd = files
    laion = {f"layers.{i}.{p}": torch.zeros(1) for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    torch.save(laion, tmp_path / "laion.pth")
    with pytest.raises(ValueError, match=r"not an Aesthetic Predictor v2.5 head.*scoring_head.0/2/4/6/8"):
        AestheticV25Reward.from_pretrained(tmp_path / "laion.pth", root / "siglip-vision")
    torch.save({**sd, "scoring_head.10.weight": torch.zeros(1, 1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected \['scoring_head.10.weight'\]"):
        load_head(tmp_path / "extra.pth")


def test_a_head_of_the_wrong_shape_is_refused(files, tmp_path):
    root, _ = files
    torch.save(upstream_head_state_dict(width=1152), tmp_path / "so400m-head.pth")  # the real head, tiny backbone
    with pytest.raises(ValueError, match=r"head takes 1152-d embeddings but the SigLIP backbone gives 32-d ones"):
        AestheticV25Reward.from_pretrained(tmp_path / "so400m-head.pth", root / "siglip-vision")
    with pytest.raises(ValueError, match=r"wrong shape: scoring_head.0.weight \(1024, 1152\) \(expected \(1024, 32\)"):
        load_head(tmp_path / "so400m-head.pth", WIDTH)
    sd = upstream_head_state_dict()
    sd["scoring_head.4.weight"] = sd["scoring_head.4.weight"].t().contiguous()
    torch.save(sd, tmp_path / "transposed.pth")
    with pytest.raises(ValueError, match=r"scoring_head.4.weight \(128, 64\) \(expected \(64, 128\)\)"):
        load_head(tmp_path / "transposed.pth")


def test_a_head_file_with_pickled_code_is_refused_without_running_it(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"scoring_head.0.weight": torch.zeros(1), "extra": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="evil.pth.*pickled Python objects.*refused, nothing in it ran"):
        load_head(tmp_path / "evil.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth.* is not a readable PyTorch weights file"):
        load_head(tmp_path / "garbage.pth")


def test_a_backbone_that_is_not_siglip_is_refused(files, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root, _ = files
    CLIPVisionModel(CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=64, patch_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a SigLIP model"):
        AestheticV25Reward.from_pretrained(root / "head.safetensors", tmp_path)
    with pytest.raises(ValueError, match="no config.json"):
        AestheticV25Reward.from_pretrained(root / "head.safetensors", tmp_path / "missing")


# ============================================================================================ config wiring
def _cfg(path, *extra):
    return build_config({}, ["reward.kind=aesthetic-v25", f"reward.path={path}", *extra])


def test_the_config_builds_it(files):
    root, sd = files
    assert "aesthetic-v25" in REWARD_KINDS
    cfg = _cfg(root / "aesthetic_predictor_v2_5.pth", f"reward.siglip_backbone={root / 'siglip-vision'}",
               "reward.form=absolute", "reward.divisor=4")
    assert cfg.reward.clip_backbone == "openai/clip-vit-large-patch14"  # the LAION predictor's field is untouched
    reward = load_reward(cfg, CPU)
    assert type(reward) is AestheticV25Reward and reward.divisor == 4.0 and reward.name == "aesthetic-v25"
    direct = reward_from_config(cfg.reward)
    built = build_reward("aesthetic-v25", str(root / "head.safetensors"), siglip_backbone=str(root / "siglip-vision"),
                         divisor=4.0)
    images = real_images(SIZE, SIZE, n=2)
    with torch.no_grad():
        expected = reference_scores(reward.vision, sd, images * 2 - 1) / 4
        for r in (reward, direct, built):
            torch.testing.assert_close(r(images, PROMPTS), expected, rtol=1e-5, atol=1e-5)
    assert build_config({}, []).reward.siglip_backbone == "google/siglip-so400m-patch14-384"


def test_direct_align_needs_no_form(files):
    root, _ = files
    cfg = build_config({}, ["method=direct-align", "reward.kind=aesthetic-v25",
                            f"reward.path={root / 'head.safetensors'}",
                            f"reward.siglip_backbone={root / 'siglip-vision'}"])
    assert type(load_reward(cfg, CPU)) is AestheticV25Reward


@pytest.mark.parametrize("form", ["official", "paper", "relative"])
def test_the_relative_srpo_forms_are_refused(files, form):
    root, _ = files
    cfg = _cfg(root / "head.safetensors", f"reward.siglip_backbone={root / 'siglip-vision'}", f"reward.form={form}")
    with pytest.raises(RewardError, match=r"reward.kind=aesthetic-v25 is image-only.*reward.form=absolute"):
        load_reward(cfg, CPU)
    reward = reward_from_config(cfg.reward)
    with pytest.raises(ValueError, match="image-only"):
        semantic_relative_reward(reward, real_images(64, 64, n=2), PROMPTS, form, 0.1, "detailed", "painting")


def test_missing_weights_are_named_through_the_config(files, tmp_path):
    root, _ = files
    cfg = _cfg(tmp_path / "nothing.pth", f"reward.siglip_backbone={root / 'siglip-vision'}", "reward.form=absolute")
    with pytest.raises(RewardError, match=r"reward.kind=aesthetic-v25: .*does not exist"):
        load_reward(cfg, CPU)


def test_it_can_be_a_weighted_sum_term(files):
    root, _ = files
    cfg = build_config({}, ["reward.kind=sum", f"reward.siglip_backbone={root / 'siglip-vision'}",
                            "reward.terms.kinds=[aesthetic-v25]", f"reward.terms.paths=[{root / 'head.safetensors'}]",
                            "reward.terms.means=[5.5]", "reward.terms.stds=[0.5]", "reward.form=absolute"])
    reward = load_reward(cfg, CPU)
    assert isinstance(reward, WeightedSumReward) and not reward.text_conditioned
    assert reward.describe() == "reward = 1 * (aesthetic-v25 - 5.5) / 0.5"
    with pytest.raises(ConfigError, match="reward.terms.kinds"):
        build_config({}, ["reward.kind=sum", "reward.terms.kinds=[aesthetic-v2.5]", "reward.terms.paths=[a]"])
