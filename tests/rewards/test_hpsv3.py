"""HPSv3 (``reward.kind=hpsv3``) on a tiny random Qwen2-VL built from transformers' classes, offline.

* The reference path is the official one, transliterated: qwen-vl-utils' PIL bicubic resize of a PIL image,
  transformers' ``Qwen2VLProcessor`` (chat template, placeholder expansion, ``Qwen2VLImageProcessorPil``), then the
  official reward forward (embed, scatter the vision tower's tokens, run ``Qwen2VLModel`` with ``input_ids=None`` so
  transformers picks the positions, ``rm_head`` at ``<|Reward|>``). Our tensor path must give the same (mu, sigma).
* Gradients reach the image and never the reward; a checkpoint saved as safetensors (official key layout) loads back
  through the registry to the same score; wrong files fail in one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from image_helpers import real_images, to_pil
from PIL import Image
from safetensors.torch import save_file

from directalign.rewards import hpsv3
from directalign.rewards.registry import RewardError, build_reward

PROMPTS = ["a red circle on a blue background", "a green square"]
SIDE = 112  # tests use 112 x 112 model inputs (8 x 8 patches, 16 tokens) instead of the published 448 x 448
PIXELS = SIDE * SIDE
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>", "\n")
# Qwen2-VL-Instruct's chat template, the part a one-turn image + text conversation uses.
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """A word-level stand-in for Qwen2Tokenizer over the instruction's words (Qwen2-VL's special tokens kept)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words = [w for p in [*PROMPTS, "system You are a helpful assistant user", hpsv3.reward_text("")]
             for w, _ in pre.pre_tokenize_str(p.replace(hpsv3.REWARD_TOKEN, ""))]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*SPECIAL, "<unk>", *words]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(reward, tokenizer dir): a 2 + 2 layer Qwen2-VL with the published head widths (text 128, vision 80)."""
    return build_tiny_hpsv3(tmp_path_factory.mktemp("hpsv3"))


def build_tiny_hpsv3(tmp):
    """:func:`parts` in ``tmp`` (also used by the registry tests)."""
    from transformers import Qwen2VLConfig, Qwen2VLModel

    tiny_tokenizer().save_pretrained(tmp / "tok")
    tok = hpsv3.load_tokenizer(tmp / "tok")  # adds <|Reward|> as the last id
    f = hpsv3.QWEN2VL_FACTS
    ids = tok.convert_tokens_to_ids(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>"])
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 128, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 1, "num_key_value_heads": 1, "rms_norm_eps": f["rms_norm_eps"],
                     "max_position_embeddings": f["max_position_embeddings"], "pad_token_id": tok.pad_token_id,
                     "initializer_range": 0.1,
                     "rope_parameters": {"rope_type": "default", "rope_theta": f["rope_theta"],
                                         "mrope_section": f["mrope_section"]}},
        vision_config={"depth": 2, "embed_dim": 80, "hidden_size": 128, "num_heads": 1, "mlp_ratio": 2,
                       "hidden_act": f["vision_act"], "initializer_range": 0.1},
        image_token_id=ids[0], video_token_id=ids[1], vision_start_token_id=ids[2])
    torch.manual_seed(0)
    model = Qwen2VLModel(config).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a wrong mapping shows
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    head = torch.nn.Sequential(torch.nn.Linear(128, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                               torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    with torch.no_grad():
        head[5].weight.mul_(20)  # a score spread of about 1 over images, so the tolerances below mean something
    reward = hpsv3.HPSv3Reward(model, head, tok, min_pixels=PIXELS, max_pixels=PIXELS)
    return reward, tmp / "tok"


def official_mu_sigma(reward, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The official pipeline on PIL images: process_vision_info's resize, Qwen2VLProcessor, the reward forward."""
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class ImageOnlyProcessor(Qwen2VLProcessor):  # the video processor needs torchvision, absent here; unused
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    processor = ImageOnlyProcessor(image_processor=Qwen2VLImageProcessorPil(), tokenizer=reward.tokenizer,
                                   video_processor=None, chat_template=TEMPLATE)
    pils = []
    for img in images:
        h, w = hpsv3.smart_resize(img.shape[-2], img.shape[-1], 28, PIXELS, PIXELS)
        pils.append(to_pil(img).resize((w, h), Image.BICUBIC))
    messages = [[{"role": "user", "content": [{"type": "image", "image": p},
                                             {"type": "text", "text": hpsv3.reward_text(t)}]}]
                for p, t in zip(pils, prompts)]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = processor(text=text, images=pils, padding=True, return_tensors="pt")
    core, ids = reward.model, batch["input_ids"]
    with torch.no_grad():
        embeds = core.get_input_embeddings()(ids)
        image = core.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        slots = (ids == core.config.image_token_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, image)
        hidden = core(input_ids=None, inputs_embeds=embeds, attention_mask=batch["attention_mask"])[0]
        logits = reward.head(hidden.float())
        return logits[ids == reward.reward_id].view(len(prompts), -1)


def test_preprocessing_equals_qwen2vl_image_processor():
    """Exact-size images (no resize): our patches equal Qwen2VLImageProcessorPil's on the PIL image."""
    from transformers import Qwen2VLImageProcessorPil

    images = real_images(SIDE, 2 * SIDE, n=2)
    ours, grid = hpsv3.preprocess(images, PIXELS * 2, PIXELS * 2)
    ref = Qwen2VLImageProcessorPil()(images=[to_pil(i) for i in images], return_tensors="np")
    assert grid.tolist() == ref["image_grid_thw"].tolist() == [[1, 8, 16]] * 2
    assert torch.allclose(ours, torch.as_tensor(np.asarray(ref["pixel_values"])), atol=1e-5)


def test_smart_resize_is_qwen_vl_utils_rule():
    assert hpsv3.smart_resize(1024, 1024) == (448, 448)  # 256 tokens for a square image, from above ...
    assert hpsv3.smart_resize(256, 256) == (448, 448)  # ... and from below
    h, w = hpsv3.smart_resize(720, 1280)
    assert h % 28 == w % 28 == 0 and h * w <= hpsv3.PIXELS and abs(w / h - 1280 / 720) < 0.05


def test_score_equals_official_path_on_exact_size_images(parts):
    reward, _ = parts
    images = real_images(SIDE, SIDE, n=2)
    with torch.no_grad():
        ours = reward.mu_sigma(reward.encode_images(images), PROMPTS)
    ref = official_mu_sigma(reward, images, PROMPTS)
    assert ours.shape == (2, 2)
    assert torch.allclose(ours, ref, atol=1e-4), (ours, ref)  # measured: 0 (bit-identical)
    assert (ours[0] - ours[1]).abs().max() > 0.05  # the prompts and images matter (mu spread ~0.3 over images)


def test_score_equals_official_path_through_the_resize(parts):
    """64 x 64 images upsampled to 112 x 112: PIL resizes in 8-bit fixed point, we in float. Measured gap: 4.2e-3
    (200 -> 112 downsampling: 9e-4) for a mu spread (std over images) of 0.67; the bound is 2e-2, 3 % of the
    spread."""
    reward, _ = parts
    images = real_images(64, 64, n=3, seed=1)
    prompts = PROMPTS + [PROMPTS[0]]
    with torch.no_grad():
        ours = reward.mu_sigma(reward.encode_images(images), prompts)
    ref = official_mu_sigma(reward, images, prompts)
    assert (ours - ref).abs().max() < 2e-2, (ours, ref)
    assert ours[:, 0].std() > 0.2  # the gap is small against what the images change
    no_clamp = hpsv3.HPSv3Reward(reward.model, reward.head, reward.tokenizer, min_pixels=PIXELS,
                                 max_pixels=PIXELS, clamp_resized=False)
    with torch.no_grad():
        assert torch.isfinite(no_clamp(images, prompts)).all()


def test_batched_texts_equal_one_at_a_time(parts):
    """Right padding of texts of different lengths changes nothing (the causal mask hides the padding)."""
    reward, _ = parts
    images = real_images(SIDE, SIDE, n=2, seed=2)
    texts = ["Real. " + PROMPTS[0], "a green square on a red background with a long tail of words in it"]
    with torch.no_grad():
        state = reward.encode_images(images)
        both = reward.score_texts(state, texts)
        alone = torch.cat([reward.score_texts(state[i:i + 1], texts[i:i + 1]) for i in range(2)])
    assert torch.allclose(both, alone, atol=1e-5)


def test_gradients_reach_the_image_not_the_reward(parts):
    reward, _ = parts
    images = real_images(64, 64, n=2, seed=3).requires_grad_(True)
    reward(images, PROMPTS).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())


def test_score_is_mu_over_divisor(parts):
    reward, _ = parts
    images = real_images(SIDE, SIDE, n=2, seed=4)
    halved = hpsv3.HPSv3Reward(reward.model, reward.head, reward.tokenizer, divisor=2.0, min_pixels=PIXELS,
                               max_pixels=PIXELS)
    with torch.no_grad():
        ms = reward.mu_sigma(reward.encode_images(images), PROMPTS)
        assert torch.allclose(halved(images, PROMPTS), ms[:, 0] / 2, atol=1e-6)


def official_layout(reward) -> dict:
    """The reward's weights under the key names of transformers 4.45's Qwen2VLRewardModelBT, lm_head included."""
    sd = {}
    for k, v in reward.model.state_dict().items():
        sd[k if k.startswith("visual.") else "model." + k[len("language_model."):]] = v.contiguous()
    sd["lm_head.weight"] = torch.zeros_like(reward.model.language_model.embed_tokens.weight)
    sd.update({f"rm_head.{k}": v for k, v in reward.head.state_dict().items()})
    return sd


def test_safetensors_checkpoint_loads_back_to_the_same_score(parts, tmp_path):
    reward, tok_dir = parts
    save_file(official_layout(reward), str(tmp_path / "HPSv3.safetensors"))
    loaded = build_reward("hpsv3", str(tmp_path / "HPSv3.safetensors"), tokenizer=str(tok_dir))
    loaded.min_pixels = loaded.max_pixels = PIXELS
    images = real_images(SIDE, SIDE, n=2, seed=5)
    with torch.no_grad():
        assert torch.allclose(loaded(images, PROMPTS), reward(images, PROMPTS), atol=1e-5)
    assert loaded.model.config.text_config.num_attention_heads == 1  # 128-wide heads, inferred
    half = build_reward("hpsv3", str(tmp_path / "HPSv3.safetensors"), tokenizer=str(tok_dir), dtype=torch.bfloat16)
    half.min_pixels = half.max_pixels = PIXELS
    assert half.model.visual.get_dtype() == torch.bfloat16 and next(half.head.parameters()).dtype == torch.float32
    with torch.no_grad():  # bf16 weights as the official inference; the head stays float32
        assert (half(images, PROMPTS) - loaded(images, PROMPTS)).abs().max() < 0.1  # measured 0.03 (mu spread ~0.3-0.7)
    assert loaded.model.config.vision_config.depth == 2 and loaded.model.config.vision_config.num_heads == 1


def test_wrong_files_fail_in_one_line(parts, tmp_path):
    reward, tok_dir = parts
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}, str(tmp_path / "clip.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    bad = official_layout(reward)
    bad["model.norm.weight"] = torch.ones(64)  # one tensor of another shape
    save_file(bad, str(tmp_path / "badshape.safetensors"))
    for name in ("clip.safetensors", "broken.safetensors", "missing.safetensors", "badshape.safetensors"):
        with pytest.raises((RewardError, ValueError, OSError)) as e:
            from directalign.engine.config import RewardConfig
            from directalign.rewards.registry import load_reward

            load_reward(RewardConfig(kind="hpsv3", path=str(tmp_path / name), tokenizer=str(tok_dir),
                                     form="absolute"), "cpu", "absolute")
        assert isinstance(e.value, RewardError) and "\n" not in str(e.value) and name in str(e.value)
