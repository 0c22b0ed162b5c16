"""MPS (``reward.kind=mps``) on a tiny random CLIP + fusion, offline.

* The score against a hand-written reference of the official ``infer_one_sample`` (one prompt at a time, the mask's
  maximum over that batch of one, the fusion written out from the raw state dict tensors): equal to float precision.
* The condition mask in closed form; batching prompts changes nothing; gradients reach the image only; a converted
  checkpoint loads back through the registry to the same score; the published pickled checkpoint is refused in one
  line that names ``tools/convert_mps.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from image_helpers import real_images
from safetensors.torch import save_file

from directalign.rewards import mps
from directalign.rewards.loading import WeightsFileError
from directalign.rewards.preprocess import published_preprocess
from directalign.rewards.registry import RewardError, build_reward, load_reward
from directalign.world_paths import reward_dir

PROMPTS = ["a red circle on a blue background", "a green square", "a textured blue triangle"]
HEADS, DIM_HEAD = 2, 8


@pytest.fixture(scope="module")
def reward():
    return build_tiny_mps()


def build_tiny_mps():
    """A tiny MPS (CLIP + fusion) with every weight away from its default (also used by the registry tests)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    tok = AutoTokenizer.from_pretrained(reward_dir())  # the tiny world's CLIP tokenizer: 32 tokens, length 20
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 1, "max_position_embeddings": tok.model_max_length,
                     "hidden_act": "gelu", "eos_token_id": tok.eos_token_id, "projection_dim": 16},
        vision_config={"hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 1,
                       "image_size": 56, "patch_size": 14, "hidden_act": "gelu", "projection_dim": 16},
        projection_dim=16)
    torch.manual_seed(0)
    clip = CLIPModel(config)
    fusion = mps.MPSFusion(dim=16, layers=2, heads=HEADS, dim_head=DIM_HEAD)
    with torch.no_grad():  # every weight away from its default (norms 1, biases 0), so a wrong mapping shows
        for p in [*clip.parameters(), *fusion.parameters()]:
            p.add_(0.1 * torch.randn_like(p)) if p.ndim == 1 else p.normal_(0, 0.3)
    return mps.MPSReward(clip.eval(), fusion.eval(), tok)


def ref_fusion(sd: dict, x: torch.Tensor, ctx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross_model's forward written out from its state dict (mask: (B, N, L) of 0 / -inf)."""
    b, n, d = x.shape
    layers = len({k.split(".")[1] for k in sd})
    for i in range(layers):
        p = f"layers.{i}.0.fn."
        h = F.layer_norm(x, (d,), sd[p + "norm.weight"], sd[p + "norm.bias"])
        q = (h @ sd[p + "to_q.weight"].T).reshape(b, n, HEADS, DIM_HEAD).permute(0, 2, 1, 3) * DIM_HEAD ** -0.5
        kv = ctx @ sd[p + "to_kv.weight"].T
        k, v = kv[..., :DIM_HEAD], kv[..., DIM_HEAD:]
        attn = torch.softmax(q @ k.transpose(1, 2)[:, None] + mask[:, None], dim=-1)
        out = (attn @ v[:, None]).permute(0, 2, 1, 3).reshape(b, n, -1) @ sd[p + "to_out.weight"].T
        val, gate = (h @ sd[p + "ff.0.weight"].T).chunk(2, dim=-1)
        x = x + out + (F.silu(gate) * val) @ sd[p + "ff.2.weight"].T
        p = f"layers.{i}.1.fn."
        h = F.layer_norm(x, (d,), sd[p + "norm.weight"], sd[p + "norm.bias"])
        q, k, v, ff = (h @ sd[p + "fused_attn_ff_proj.weight"].T).split(
            [HEADS * DIM_HEAD, DIM_HEAD, DIM_HEAD, sd[p + "fused_attn_ff_proj.weight"].shape[0] - HEADS * DIM_HEAD
             - 2 * DIM_HEAD], dim=-1)
        angles = torch.arange(n, dtype=torch.float)[:, None] * sd[p + "rotary_emb.inv_freq"][None]
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

        def rot(t, cos=cos, sin=sin):
            half = t.shape[-1] // 2
            return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

        q = rot(q.reshape(b, n, HEADS, DIM_HEAD).permute(0, 2, 1, 3)) * DIM_HEAD ** -0.5
        attn = torch.softmax(q @ rot(k).transpose(1, 2)[:, None], dim=-1)
        out = (attn @ v[:, None]).permute(0, 2, 1, 3).reshape(b, n, -1) @ sd[p + "attn_out.weight"].T
        val, gate = ff.chunk(2, dim=-1)
        x = x + out + (F.silu(gate) * val) @ sd[p + "ff_out.1.weight"].T
    return x


def official_score(r: mps.MPSReward, image: torch.Tensor, prompt: str, threshold: float = 0.3) -> float:
    """infer_one_sample of eval_overall_mps_on_hpdv2.py, batch of one, on the tiny model."""
    clip = r.clip

    def tokens(text):
        ids = r.tokenizer(text, max_length=r.tokenizer.model_max_length, padding="max_length", truncation=True,
                          return_tensors="pt").input_ids
        out = clip.text_model(input_ids=ids)
        return clip.text_projection(out.last_hidden_state), clip.text_projection(out.pooler_output)

    with torch.no_grad():
        text_f, text_eos = tokens(prompt)
        cond_f, _ = tokens(mps.CONDITION)
        pixels = published_preprocess(image[None], 56, "floor")
        image_f = clip.visual_projection(clip.vision_model(pixel_values=pixels).last_hidden_state)
        sim = torch.einsum("bid,bjd->bji", text_f, cond_f).max(dim=1, keepdim=True)[0]
        sim = sim / sim.max()
        mask = torch.where(sim > threshold, 0.0, float("-inf")).repeat(1, image_f.shape[1], 1)
        fsd = {k: v for k, v in r.fusion.state_dict().items()}
        img = ref_fusion(fsd, image_f, text_f, mask)[:, 0]
        img, txt = img / img.norm(dim=-1, keepdim=True), text_eos / text_eos.norm(dim=-1, keepdim=True)
        return float(clip.logit_scale.exp() * (txt @ img.T)[0, 0])


@pytest.mark.parametrize("threshold", [0.3, 0.9])
def test_score_equals_the_official_computation(reward, threshold):
    """0.3: the published threshold (on the tiny model every token passes it); 0.9 masks some tokens of each
    prompt, so the masked cross-attention is checked too."""
    r = mps.MPSReward(reward.clip, reward.fusion, reward.tokenizer, threshold=threshold)
    images = real_images(80, 64, n=3)
    with torch.no_grad():
        ours = r(images, PROMPTS)
    ref = torch.tensor([official_score(r, img, p, threshold) for img, p in zip(images, PROMPTS)])
    assert torch.allclose(ours, ref, atol=1e-5), (ours, ref)  # measured: <= 7e-8
    assert ours.std() > 0.05  # the images and prompts change the score (spread 0.08)
    masked = torch.isinf(r.text_state(PROMPTS)[2]).sum(-1)
    assert (masked > 0).all() == (threshold == 0.9) and (masked < masked.new_tensor(20)).all()


def test_condition_mask_closed_form():
    e1, e2 = torch.eye(4)[0], torch.eye(4)[1]
    text = torch.stack([2 * e1, 0.5 * e1, -e1, e2 + 0.2 * e1])[None]
    cond = torch.stack([e1, -e2])[None]
    mask = mps.condition_mask(text, cond, threshold=0.3)
    # each token's best similarity to a condition token: 2, 0.5, max(-1, 0) = 0, max(0.2, -1) = 0.2; over the
    # prompt's best (2): 1, 0.25, 0, 0.1
    assert mask.tolist() == [[0.0, float("-inf"), float("-inf"), float("-inf")]]
    assert mps.condition_mask(text, cond, threshold=0.2).tolist() == [[0.0, 0.0, float("-inf"), float("-inf")]]


def test_batched_prompts_equal_one_at_a_time(reward):
    images = real_images(56, 56, n=3, seed=1)
    with torch.no_grad():
        both = reward(images, PROMPTS)
        alone = torch.cat([reward(images[i:i + 1], PROMPTS[i:i + 1]) for i in range(3)])
    assert torch.allclose(both, alone, atol=1e-5)


def test_gradients_reach_the_image_not_the_reward(reward):
    images = real_images(64, 64, n=2, seed=2).requires_grad_(True)
    reward(images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())


def published_layout(r: mps.MPSReward) -> dict:
    sd = {f"model.{k}": v for k, v in r.clip.state_dict().items()}
    sd["model.text_model.embeddings.position_ids"] = torch.arange(r.tokenizer.model_max_length)[None]  # old buffers
    sd.update({f"cross_model.{k}": v for k, v in r.fusion.state_dict().items()})
    return {k: v.contiguous() for k, v in sd.items()}


def test_converted_checkpoint_loads_back_to_the_same_score(reward, tmp_path):
    save_file(published_layout(reward), str(tmp_path / "mps.safetensors"))
    loaded = build_reward("mps", str(tmp_path / "mps.safetensors"), tokenizer=str(reward_dir()), divisor=2.0)
    images = real_images(56, 56, n=2, seed=3)
    with torch.no_grad():
        assert torch.allclose(loaded(images, PROMPTS[:2]), reward(images, PROMPTS[:2]) / 2, atol=1e-5)
    assert len(loaded.fusion.layers) == 2 and loaded.fusion.layers[0][0].fn.heads == HEADS
    half = build_reward("mps", str(tmp_path / "mps.safetensors"), tokenizer=str(reward_dir()), dtype=torch.bfloat16)
    with torch.no_grad():  # bf16 rounding: measured 2e-3
        assert (half(images, PROMPTS[:2]).float() - reward(images, PROMPTS[:2])).abs().max() < 0.02


def test_pickled_whole_model_is_refused_naming_the_converter(reward, tmp_path):
    torch.save(reward.fusion, tmp_path / "MPS_overall_checkpoint.pth")  # a whole pickled module, as published
    with pytest.raises(WeightsFileError) as e:
        mps.load_mps_state_dict(tmp_path / "MPS_overall_checkpoint.pth")
    assert "tools/convert_mps.py" in str(e.value) and "\n" not in str(e.value)
    from directalign.engine.config import RewardConfig

    partial = published_layout(reward)
    del partial["cross_model.layers.1.1.fn.attn_out.weight"]
    save_file(partial, str(tmp_path / "partial.safetensors"))
    for name in ("MPS_overall_checkpoint.pth", "missing.safetensors", "partial.safetensors"):
        with pytest.raises(RewardError) as e:
            load_reward(RewardConfig(kind="mps", path=str(tmp_path / name), tokenizer=str(reward_dir()),
                                     form="absolute"), "cpu", "absolute")
        assert "\n" not in str(e.value) and name in str(e.value)


def test_convert_tool_writes_a_loadable_checkpoint(reward, tmp_path, monkeypatch):
    """tools/convert_mps.py on a whole pickled model whose class lives in a stand-in of the MPS repository."""
    import importlib.util
    import sys

    from helpers import REPO

    pkg = tmp_path / "repo" / "fake_mps"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import torch\nclass Whole(torch.nn.Module):\n    def __init__(self, clip, fusion):\n"
        "        super().__init__()\n        self.model, self.cross_model = clip, fusion\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # the tool prepends the repository; undone after the test
    monkeypatch.syspath_prepend(str(tmp_path / "repo"))
    whole = importlib.import_module("fake_mps").Whole(reward.clip, reward.fusion)
    torch.save(whole, tmp_path / "MPS_overall_checkpoint.pth")
    monkeypatch.delitem(sys.modules, "fake_mps")
    spec = importlib.util.spec_from_file_location("convert_mps", REPO / "tools" / "convert_mps.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.main([str(tmp_path / "MPS_overall_checkpoint.pth"), str(tmp_path / "out.safetensors"),
               "--mps-repo", str(tmp_path / "repo")])
    loaded = build_reward("mps", str(tmp_path / "out.safetensors"), tokenizer=str(reward_dir()))
    images = real_images(56, 56, n=2, seed=4)
    with torch.no_grad():
        assert torch.allclose(loaded(images, PROMPTS[:2]), reward(images, PROMPTS[:2]), atol=1e-6)
