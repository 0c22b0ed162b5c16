"""The planner's video and VLM-reward terms against the real tiny modules (issue 17, item 3).

* Wan: the differentiable graph decodes the whole clip (every latent frame through the causal 3-D VAE, as
  ``WanAdapter.decode``) and the reward scores every decoded frame (``rewards/video.video_reward``): the planner's
  FLOPs on meta modules equal those of the adapter's own decode and the real video reward on a tiny Wan, and its
  activation peak matches the C allocator's on a real differentiable step (transformer -> decode -> reward ->
  backward).
* HPSv3: the planner's meta scorer (``plan/reward_models.HPSv3Scorer``) makes the model calls the real
  ``HPSv3Reward`` makes for SRPO's two control phrases (equal FLOPs on a tiny Qwen2-VL), and the shipped
  Qwen2-VL-7B-Instruct config has the published size.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import PROMPTS, build_parts, tiny_config
from test_plan import AllocatorPeak, _mallinfo
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from directalign.adapters.tiny_wan import tiny_wan_pipeline
from directalign.adapters.wan import WanAdapter
from directalign.config import load_config, packaged_config
from directalign.plan import measure, probes, reward_models
from directalign.plan.estimate import plan, setup_transformer
from directalign.plan.sources import build_meta, count_params, plan_configs_dir
from directalign.rewards.relative import semantic_relative_reward
from directalign.rewards.video import video_reward

META = torch.device("meta")
SIDE = 16


@pytest.fixture(scope="module")
def wan_parts():
    cfg = tiny_config("srpo")
    _, reward, _, _ = build_parts(cfg)
    adapter = WanAdapter(tiny_wan_pipeline(0), frames=5)
    adapter.transformer.requires_grad_(True)  # full fine-tuning: the transformer's backward runs
    return cfg, adapter, reward


def _meta_modules(cfg, adapter, reward):
    config = {**adapter.transformer.config, "_class_name": type(adapter.transformer).__name__}
    transformer = setup_transformer(config, cfg.train, "wan", torch.float32, "full")
    vae = build_meta({**adapter.vae.config, "_class_name": type(adapter.vae).__name__}, torch.float32)
    clip = build_meta(reward.model.config.to_dict(), torch.float32).requires_grad_(False)
    return transformer, vae.requires_grad_(False), clip


def _shapes(adapter, tokens):
    return probes.Shapes(1, SIDE, SIDE, adapter.latent_hw(SIDE, SIDE), tokens, adapter.latent_frames())


def test_wan_graph_decodes_the_whole_clip_and_scores_every_frame(wan_parts):
    cfg, adapter, reward = wan_parts
    prompts = PROMPTS[:1]
    reward(torch.zeros(1, 3, SIDE, SIDE), prompts)  # the text side is cached per prompt, as in training
    x = adapter.noise(1, SIDE, SIDE, torch.Generator().manual_seed(0)).requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        video = adapter.decode(x, SIDE, SIDE)  # the real code: (B, F, 3, H, W)
        decode_flops = fc.get_total_flops()
        video_reward(reward, video, prompts)
    reward_flops = fc.get_total_flops() - decode_flops
    assert video.shape[:3] == (1, adapter.frames, 3) and adapter.latent_frames() > 1
    transformer, vae, clip = _meta_modules(cfg, adapter, reward)
    shapes = _shapes(adapter, adapter.encode_prompts(prompts).tokens.shape[1])
    wan = probes.TRANSFORMER_PROBES["WanTransformer3DModel"]
    on_meta = measure.graph_cost(transformer, wan, shapes, torch.float32, META, vae, False, clip, fused=False)
    assert on_meta.vae_forward == decode_flops > 0
    assert on_meta.reward_forward == reward_flops > 0
    # the same graph on the real CPU modules: every term, backward included, equal
    with sdpa_kernel(SDPBackend.MATH):
        real = measure.graph_cost(adapter.transformer, wan, shapes, torch.float32, torch.device("cpu"), adapter.vae,
                                  False, reward.model)
    for key in ("transformer_forward", "transformer_train", "vae_forward", "vae_train", "reward_forward",
                "reward_train"):
        assert getattr(real, key) == getattr(on_meta, key) > 0, key
    # the reward runs once per decoded frame: F times one frame's score
    with FlopCounterMode(display=False) as one:
        reward_models.score(clip, torch.zeros(1, 3, SIDE, SIDE, device=META))
    assert on_meta.reward_forward == adapter.frames * one.get_total_flops()


def test_wan_activation_peak_matches_the_allocator(wan_parts):
    """The planner's activation peak of one differentiable graph (meta modules, fused attention) against the C
    allocator's peak increment over the real one on CPU: the adapter's velocity, the whole-clip decode, the video
    reward on every frame, backward (weight gradients dropped as they accumulate, as the planner counts them
    separately)."""
    inuse = _mallinfo()
    cfg, adapter, reward = wan_parts
    prompts = PROMPTS[:1]
    embeds = adapter.encode_prompts(prompts)
    x = adapter.noise(1, SIDE, SIDE, torch.Generator().manual_seed(0))
    params = [p for p in adapter.transformer.parameters() if p.requires_grad]
    hooks = measure._drop_grads(params)

    def step():
        v = adapter.velocity(x, torch.tensor([0.5]), embeds, 1.0, SIDE, SIDE)
        video_reward(reward, adapter.decode(v, SIDE, SIDE), prompts).mean().backward()

    try:
        step()  # warm-up: caches, lazy buffers
        with AllocatorPeak(inuse) as mode:
            step()
    finally:
        for h in hooks:
            h.remove()
    transformer, vae, clip = _meta_modules(cfg, adapter, reward)
    shapes = _shapes(adapter, embeds.tokens.shape[1])
    g = measure.graph_cost(transformer, probes.TRANSFORMER_PROBES["WanTransformer3DModel"], shapes, torch.float32,
                           META, vae, False, clip)
    print(f"tiny Wan graph: planner {g.peak_bytes / 2**20:.2f} MiB, allocator {mode.peak / 2**20:.2f} MiB")
    assert mode.peak == pytest.approx(g.peak_bytes, rel=0.15)


def test_wan_plan_counts_every_frame():
    """The shipped Wan configs' plans: the decode and reward terms grow with the clip's frames."""
    short = plan(load_config(packaged_config("wan21-srpo-hpsv2"), ["model.frames=5", "model.height=64",
                                                                     "model.width=64"]))
    longer = plan(load_config(packaged_config("wan21-srpo-hpsv2"), ["model.frames=9", "model.height=64",
                                                                      "model.width=64"]))
    assert (short["video"]["frames"], longer["video"]["frames"]) == (5, 9)
    assert short["reward"]["images_per_graph"] == 5 and longer["reward"]["images_per_graph"] == 9
    assert longer["measured"]["reward_forward"] == pytest.approx(9 / 5 * short["measured"]["reward_forward"])
    assert longer["measured"]["vae_forward"] > short["measured"]["vae_forward"]
    assert any("whole clip" in n for n in short["notes"])


def _tiny_hpsv3():
    path = Path(__file__).resolve().parents[1] / "rewards" / "test_hpsv3.py"
    spec = importlib.util.spec_from_file_location("_hpsv3_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hpsv3_scorer_makes_the_real_rewards_calls(tmp_path):
    """SRPO's reward on a tiny Qwen2-VL HPSv3: the real ``semantic_relative_reward`` (vision tower once, the
    language model for the positive and the negative phrase) and the planner's meta scorer, fed the same token
    layout, count equal FLOPs, forward and backward to the image."""

    fixtures = _tiny_hpsv3()
    real, _ = fixtures.build_tiny_hpsv3(tmp_path)
    prompt, pos, neg = PROMPTS[0], "Realistic photo", "Painting"
    images = torch.rand(1, 3, 56, 56, requires_grad=True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        score = semantic_relative_reward(real, images, [prompt], "official", 0.0, pos, neg)
        forward = fc.get_total_flops()
        score.sum().backward()
    total = fc.get_total_flops()
    texts = [f"{w}. {prompt}" for w in (pos, neg)]  # rewards/relative.control_prompt
    config = real.model.config.to_dict()
    meta = build_meta(config, torch.float32, "Qwen2VLModel")
    hidden = real.model.config.text_config.hidden_size
    with torch.device("meta"):  # the published rm_head's shape, as the real reward's head
        head = torch.nn.Sequential(torch.nn.Linear(hidden, 1024), torch.nn.ReLU(), torch.nn.Dropout(0.05),
                                   torch.nn.Linear(1024, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    scorer = reward_models.HPSv3Scorer(meta, head, texts).requires_grad_(False)
    scorer.pixels = real.min_pixels
    n_image = real.encode_images(images.detach()).shape[1]

    def layout(text, n):  # the real tokenizer's counts (the tiny tokenizer is word-level, not Qwen2's BPE)
        ids = real.token_ids(text, n)
        before = ids.index(real.image_id)
        return before, len(ids) - before - n

    scorer.token_layout = layout
    pixels = torch.zeros(1, 3, 56, 56, device=META, requires_grad=True)
    with FlopCounterMode(display=False) as fm:  # SDPA's math path on meta, as the real run's (see test_plan)
        out = scorer.score(pixels)
        meta_forward = fm.get_total_flops()
        out.sum().backward()
    assert n_image > 0 and meta_forward == forward > 0
    assert fm.get_total_flops() == total
    assert count_params(scorer) == count_params(real.model) + count_params(real.head)


def test_shipped_qwen2_vl_config_has_the_published_size():
    """Qwen2-VL-7B-Instruct: 8.29 B parameters with the 545 M lm_head (152064 x 3584) HPSv3 does not use; its
    vision encoder 675 M (Qwen2-VL paper, arXiv 2409.12191, Table 1)."""
    folder = plan_configs_dir() / "qwen2-vl-7b-instruct"
    cfg = load_config(packaged_config("flux-dev-srpo-hpsv3"))
    scorer = reward_models.build("hpsv3", folder, torch.bfloat16, cfg)
    assert count_params(scorer.model) + 152064 * 3584 == pytest.approx(8.29e9, rel=0.005)
    assert count_params(scorer.model.visual) == pytest.approx(675e6, rel=0.005)
    assert len(scorer.texts) == 2  # SRPO's official form: the positive and the negative phrase
    assert reward_models.text_tokens("<|im_start|>user\nHello world, a cat.<|im_end|>") == 10


@pytest.mark.slow
def test_hpsv3_plan_counts_the_reward():
    p = plan(load_config(packaged_config("flux-dev-srpo-hpsv3")))
    assert p["reward"]["modelled"] and p["params"]["reward"] > 7e9
    assert p["flops"]["reward"] > 0 and p["measured"]["reward_train"] > p["measured"]["reward_forward"] > 0
    assert p["memory_gib"]["reward_weights"] > 14 and not any("not counted" in n for n in p["notes"])
