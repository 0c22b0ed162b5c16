"""HPSv3 (Ma et al. 2025, arXiv 2508.03789): a Qwen2-VL-7B-Instruct fine-tuned as a human-preference reward, run
on transformers' own ``Qwen2VLModel`` (no ``trust_remote_code``, no ``hpsv3`` package), differentiable in the image.

What the published model does (MizzenAI/HPSv3 @ d232ff8 ``hpsv3/model/qwen2vl_trainer.py`` ``Qwen2VLRewardModelBT``,
``hpsv3/inference.py``, ``hpsv3/dataset/data_collator_qwen.py``, ``hpsv3/config/HPSv3_7B.yaml``):

* input: one chat turn of Qwen2-VL's template, the image first, then the text :data:`INSTRUCTION` (with the prompt)
  followed by :data:`REWARD_SUFFIX`, which holds the added special token ``<|Reward|>``; ``add_generation_prompt``;
* image: resized so that it holds ``256 * 28 * 28`` pixels (``min_pixels = max_pixels = 200704``; qwen-vl-utils'
  ``smart_resize``, both sides multiples of 28; 448 x 448 for a square image: 1024 patches of 14, 256 tokens after
  the 2 x 2 merge), bicubic; OpenAI CLIP mean / std; the frame repeated over the temporal patch of 2;
* positions: the reward model calls the language model with ``input_ids=None`` and no position ids, so every token,
  image tokens included, gets the plain sequential position ``0..L-1`` on all three M-RoPE axes (not Qwen2-VL's 3-D
  image positions); the checkpoint was trained that way, and :meth:`HPSv3Reward.mu_sigma` does the same;
* head: ``rm_head = Linear(d, 1024) - ReLU - Dropout - Linear(1024, 16) - ReLU - Linear(16, 2)`` (float32) on the
  last hidden state at the ``<|Reward|>`` token; its two outputs are (mu, sigma) of the preference score, and the
  official inference takes mu. **score = mu / divisor.**

Differentiable path here: :func:`preprocess` resizes the (B, 3, H, W) tensor in [0, 1] with antialiased bicubic
interpolation (PIL's kernel; clamped to [0, 1] like PIL unless ``clamp_resized=False``), normalises and cuts the
patches in Qwen2VLImageProcessor's order with tensor ops only. The vision tower runs once per image
(:meth:`encode_images`); each text (the prompt, or a control phrase for SRPO) then runs the language model.
``tests/rewards/test_hpsv3.py`` checks the score against the same model fed by transformers' ``Qwen2VLProcessor``
on a PIL image and the official forward (PIL's 8-bit resize is the only difference; see the test for the measured
gap).

Weights: ``reward.path`` = ``HPSv3.safetensors`` (hub repo ``MizzenAI/HPSv3``; a state dict, bf16, 16.6 GB), or a
``.pth`` holding only tensors (``torch.load(weights_only=True)``), or a directory holding one such file (and
optionally a ``config.json`` of a ``Qwen2VLConfig`` beside it). Keys of both transformers layouts are accepted
(``visual.*`` / ``model.*`` of transformers 4.45, ``model.visual.*`` / ``model.language_model.*`` of later versions);
``lm_head`` is not needed and dropped. Without a config.json the architecture comes from the tensor shapes plus
Qwen2-VL's fixed facts (:data:`QWEN2VL_FACTS`). ``reward.tokenizer`` (default ``Qwen/Qwen2-VL-7B-Instruct``) gives
the tokenizer; ``<|Reward|>`` is added as a special token as the official code does (id 151657, the last row of the
resized embedding).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward
from .preprocess import CLIP_MEAN, CLIP_STD

HPSV3_HUB_REPO = "MizzenAI/HPSv3"
HPSV3_FILE = "HPSv3.safetensors"
QWEN2_VL_7B = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
IMAGE_TOKEN = "<|image_pad|>"
PIXELS = 256 * 28 * 28  # HPSv3_7B.yaml min_pixels = max_pixels
# Qwen2-VL facts the state dict cannot tell (Qwen2-VL-2B/7B/72B-Instruct config.json): head widths, RoPE, norms.
QWEN2VL_FACTS = {"text_head_dim": 128, "vision_head_dim": 80, "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24],
                 "rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "vision_act": "quick_gelu"}
SYSTEM = "You are a helpful assistant."  # Qwen2-VL chat template's default system message

# The text the checkpoint was trained and evaluated with (data_collator_qwen.py INSTRUCTION and
# prompt_with_special_token); the model's score depends on it, so it is reproduced exactly.
INSTRUCTION = (
    "\nYou are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall "
    "score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 "
    "being the best. \n\n**Visual Quality:**  \nEvaluate the overall visual quality of the image. The following "
    "sub-dimensions should be considered:\n- **Reasonableness:** The image should not contain any significant "
    "biological or logical errors, such as abnormal body structures or nonsensical environmental setups.\n- "
    "**Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n- **Detail Richness:** Consider the level of detail in "
    "textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).\n- **Aesthetic and "
    "Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, "
    "depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.\n- "
    "**Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n\n**Text Alignment:**  \nAssess how well the image matches the textual prompt across the following "
    "sub-dimensions:\n- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, "
    "animal, object) align with the textual description. The subject should match the description in terms of "
    "number, appearance, and behavior.\n- **Style Relevance:** If the prompt specifies a particular artistic or "
    "stylistic style, evaluate how well the image adheres to this style.\n- **Contextual Consistency**: Assess "
    "whether the background, setting, and surrounding elements in the image logically fit the scenario described in "
    "the prompt. The environment should support and enhance the subject without contradictions.\n- **Attribute "
    "Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, "
    "expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but "
    "critical attributes should be preserved.\n- **Semantic Coherence**: Evaluate whether the overall meaning and "
    "intent of the prompt are captured in the image. The generated content should not introduce elements that "
    "conflict with or distort the original description.\nTextual prompt - {text_prompt}\n\n\n")
REWARD_SUFFIX = "\nPlease provide the overall ratings of this image: " + REWARD_TOKEN + "\n\nEND\n"


def reward_text(prompt: str) -> str:
    """The user text of one scoring turn: the instruction holding ``prompt``, then the ``<|Reward|>`` line."""
    return INSTRUCTION.format(text_prompt=prompt) + REWARD_SUFFIX


def chat_text(prompt: str, n_image_tokens: int) -> str:
    """Qwen2-VL-Instruct's chat template for one user turn (image, then text) with ``add_generation_prompt``, the
    image placeholder expanded to ``n_image_tokens`` tokens as ``Qwen2VLProcessor`` does."""
    image = "<|vision_start|>" + IMAGE_TOKEN * n_image_tokens + "<|vision_end|>"
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{image}{reward_text(prompt)}<|im_end|>\n"
            "<|im_start|>assistant\n")


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = PIXELS,
                 max_pixels: int = PIXELS) -> tuple[int, int]:
    """qwen-vl-utils' resize rule (the one HPSv3's ``process_vision_info`` applies): both sides multiples of
    ``factor``, about ``min_pixels..max_pixels`` pixels, the aspect ratio kept as closely as possible."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} is over 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def patchify(pixels: torch.Tensor, patch: int = 14, temporal: int = 2, merge: int = 2) -> torch.Tensor:
    """Normalised images (B, C, H, W) -> Qwen2-VL patches (B * H/patch * W/patch, C * temporal * patch * patch), in
    ``Qwen2VLImageProcessor``'s order (merge windows grouped, each frame repeated over the temporal patch)."""
    b, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.unsqueeze(1).expand(b, temporal, c, h, w)
    x = x.reshape(b, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # b, h-window, w-window, h-in, w-in, c, t, ph, pw
    return x.reshape(b * gh * gw, c * temporal * patch * patch)


def preprocess(images: torch.Tensor, min_pixels: int = PIXELS, max_pixels: int = PIXELS, patch: int = 14,
               merge: int = 2, temporal: int = 2, clamp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) in [0, 1] -> (patches, grid_thw (B, 3)), differentiable: smart_resize size, antialiased
    bicubic (clamped to [0, 1] as PIL unless ``clamp=False``), CLIP mean / std, :func:`patchify`."""
    h, w = smart_resize(images.shape[-2], images.shape[-1], patch * merge, min_pixels, max_pixels)
    if (h, w) != tuple(images.shape[-2:]):
        images = F.interpolate(images, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        images = images.clamp(0, 1) if clamp else images
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype)[None, :, None, None]
    std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype)[None, :, None, None]
    patches = patchify((images - mean) / std, patch, temporal, merge)
    grid = torch.tensor([[1, h // patch, w // patch]] * images.shape[0], device=images.device)
    return patches, grid


# ---------------------------------------------------------------------------------------------------- weights
_HEAD = re.compile(r"^rm_head\.(\d+)\.(weight|bias)$")


def split_state_dict(sd: dict) -> tuple[dict, dict]:
    """A published HPSv3 state dict -> (``Qwen2VLModel`` keys, ``rm_head`` keys). Both transformers layouts map;
    ``lm_head`` is dropped (the score never reads the vocabulary logits)."""
    if isinstance(sd.get("model"), dict):
        sd = sd["model"]  # the official loader unwraps {"model": state_dict}
    core, head = {}, {}
    for key, value in sd.items():
        key = key.removeprefix("module.")
        if key.startswith("rm_head."):
            head[key[len("rm_head."):]] = value
        elif key.startswith("lm_head."):
            continue
        elif key.startswith(("model.visual.", "model.language_model.")):
            core[key[len("model."):]] = value
        elif key.startswith("visual."):
            core[key] = value
        elif key.startswith("model."):
            core["language_model." + key[len("model."):]] = value
        else:
            raise ValueError(f"key {key!r} is not part of an HPSv3 (Qwen2-VL reward model) state dict")
    if not head or not core:
        raise ValueError("not an HPSv3 state dict: it needs rm_head.* and the Qwen2-VL weights (visual.*, model.*)")
    return core, head


def _count(sd: dict, prefix: str) -> int:
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in sd):
        n += 1
    return n


def config_from_state_dict(core: dict, image_token_id: int, video_token_id: int, vision_start_token_id: int,
                           pad_token_id: int | None = None, **facts):
    """A ``Qwen2VLConfig`` for the Qwen2-VL weights ``core`` (shapes from the tensors, the rest
    :data:`QWEN2VL_FACTS` unless given)."""
    from transformers import Qwen2VLConfig

    f = {**QWEN2VL_FACTS, **facts}
    try:
        embed_dim, _, temporal, patch, _ = core["visual.patch_embed.proj.weight"].shape
        vocab, hidden = core["language_model.embed_tokens.weight"].shape
        merged_in = core["visual.merger.mlp.0.weight"].shape[1]
        inter = core["language_model.layers.0.mlp.gate_proj.weight"].shape[0]
        kv = core["language_model.layers.0.self_attn.k_proj.weight"].shape[0] // f["text_head_dim"]
        mlp = core["visual.blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as e:  # a missing tensor, or one of another rank
        raise ValueError(f"not a Qwen2-VL state dict: no {e.args[0]!r}" if isinstance(e, KeyError) else
                         f"not a Qwen2-VL state dict: a tensor of another rank ({e})") from None
    rope = {"rope_type": "default", "rope_theta": f["rope_theta"], "mrope_section": list(f["mrope_section"])}
    text = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": _count(core, "language_model.layers."),
            "num_attention_heads": hidden // f["text_head_dim"], "num_key_value_heads": max(kv, 1),
            "rms_norm_eps": f["rms_norm_eps"], "max_position_embeddings": f["max_position_embeddings"],
            "rope_parameters": rope, "pad_token_id": pad_token_id}
    vision = {"depth": _count(core, "visual.blocks."), "embed_dim": embed_dim, "hidden_size": hidden,
              "hidden_act": f["vision_act"], "mlp_ratio": mlp // embed_dim,
              "num_heads": embed_dim // f["vision_head_dim"], "patch_size": patch, "temporal_patch_size": temporal,
              "spatial_merge_size": math.isqrt(merged_in // embed_dim)}
    return Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=image_token_id,
                         video_token_id=video_token_id, vision_start_token_id=vision_start_token_id)


def build_head(head_sd: dict) -> nn.Sequential:
    """The published ``rm_head`` (ranknet: Linear - ReLU - Dropout - Linear - ReLU - Linear, biases), float32."""
    layers = sorted({int(m.group(1)) for k in head_sd if (m := _HEAD.match("rm_head." + k))})
    if layers != [0, 3, 5] or len(head_sd) != 6:
        raise ValueError(f"rm_head has keys {sorted(head_sd)[:6]}; expected the ranknet head of HPSv3 "
                         "(rm_head.0/3/5 weights and biases)")
    w0, w3, w5 = (head_sd[f"{i}.weight"] for i in (0, 3, 5))
    head = nn.Sequential(nn.Linear(w0.shape[1], w0.shape[0]), nn.ReLU(), nn.Dropout(0.05),
                         nn.Linear(w3.shape[1], w3.shape[0]), nn.ReLU(), nn.Linear(w5.shape[1], w5.shape[0]))
    head.load_state_dict({k: v.float() for k, v in head_sd.items()})
    return head


def load_tokenizer(path: str | Path):
    """The Qwen2-VL tokenizer with ``<|Reward|>`` added as a special token, as the official code does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if REWARD_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    return tok


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pth")) or sorted(path.glob("*.pt"))
        if len(found) == 1:
            return found[0]
        raise ValueError(f"{path} holds {len(found)} weights files; give the HPSv3 weights file itself "
                         f"({HPSV3_FILE})")
    raise FileNotFoundError(f"{path} does not exist; reward.path must be {HPSV3_FILE} (hub repo {HPSV3_HUB_REPO})")


# ---------------------------------------------------------------------------------------------------- reward
class HPSv3Reward(Reward):
    """``model``: a transformers ``Qwen2VLModel`` (vision tower + language model); ``head``: the ``rm_head``."""

    name = "hpsv3"

    def __init__(self, model, head: nn.Module, tokenizer, *, divisor: float = 1.0, min_pixels: int = PIXELS,
                 max_pixels: int = PIXELS, clamp_resized: bool = True, name: str = "hpsv3"):
        super().__init__()
        self.model, self.head, self.tokenizer = model, head, tokenizer
        self.divisor, self.min_pixels, self.max_pixels = divisor, min_pixels, max_pixels
        self.clamp_resized, self.name = clamp_resized, name
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (REWARD_TOKEN, IMAGE_TOKEN)}
        vocab = model.config.text_config.vocab_size
        if any(i is None or i == tokenizer.unk_token_id or i >= vocab for i in ids.values()):
            raise ValueError(f"the tokenizer's {REWARD_TOKEN} / {IMAGE_TOKEN} ids {list(ids.values())} are not rows "
                             f"of the {vocab}-row embedding; give the Qwen2-VL tokenizer the checkpoint was made with")
        self.reward_id, self.image_id = ids[REWARD_TOKEN], ids[IMAGE_TOKEN]
        self._ids: dict[tuple[str, int], list[int]] = {}
        self.freeze()

    def describe(self) -> str | None:
        return f"hpsv3: mu of the Qwen2-VL reward head at {REWARD_TOKEN} / {self.divisor:g}"

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer: str | Path | None = None, dtype=torch.float32,
                        **kwargs) -> HPSv3Reward:
        from transformers import Qwen2VLConfig, Qwen2VLModel

        from .loading import load_weights_file

        p = Path(path).expanduser()
        core, head_sd = split_state_dict(load_weights_file(_weights_file(p)))
        tok = load_tokenizer(tokenizer or QWEN2_VL_7B)
        config_file = p / "config.json"
        if p.is_dir() and config_file.is_file():
            config = Qwen2VLConfig.from_json_file(str(config_file))
        else:
            ids = tok.convert_tokens_to_ids([IMAGE_TOKEN, "<|video_pad|>", "<|vision_start|>"])
            config = config_from_state_dict(core, *ids, pad_token_id=tok.pad_token_id)
        with torch.device("meta"):
            model = Qwen2VLModel(config)
        try:
            missing, unexpected = model.load_state_dict(core, strict=False, assign=True)
        except RuntimeError as e:  # a tensor of another shape
            raise ValueError(f"{p} does not fit a Qwen2-VL of the inferred shape ({_first_line(e)})") from None
        if missing or unexpected:
            raise ValueError(f"{p} does not fit a Qwen2-VL of the inferred shape: missing {missing[:2]}, "
                             f"unexpected {unexpected[:2]}")
        _materialise_buffers(model)
        return cls(model.to(dtype), build_head(head_sd), tok, **kwargs)

    # ---- scoring
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> merged image tokens (B, N, d), differentiable."""
        visual = self.model.visual
        dtype = visual.get_dtype()
        patches, grid = preprocess(images.to(dtype), self.min_pixels, self.max_pixels, visual.config.patch_size,
                                   visual.config.spatial_merge_size, visual.config.temporal_patch_size,
                                   clamp=self.clamp_resized)
        out = visual(patches, grid_thw=grid)
        tokens = getattr(out, "pooler_output", out)
        return tokens.reshape(images.shape[0], -1, tokens.shape[-1])

    def token_ids(self, text: str, n_image_tokens: int) -> list[int]:
        key = (text, n_image_tokens)
        if key not in self._ids:
            ids = self.tokenizer(chat_text(text, n_image_tokens))["input_ids"]
            if ids.count(self.reward_id) != 1 or ids.count(self.image_id) != n_image_tokens:
                raise ValueError(f"the prompt {text[:40]!r} holds {REWARD_TOKEN} or {IMAGE_TOKEN}; remove it")
            self._ids[key] = ids
        return self._ids[key]

    def mu_sigma(self, image_state: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """(B, 2): the head's (mu, sigma) for each image and its text, as the official forward computes them."""
        b, n, _ = image_state.shape
        rows = [self.token_ids(t, n) for t in texts]
        length = max(map(len, rows))
        device = image_state.device
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows], device=device)
        lm = self.model.language_model
        embeds = lm.embed_tokens(ids)
        slots = (ids == self.image_id).unsqueeze(-1).expand_as(embeds)
        embeds = embeds.masked_scatter(slots, image_state.to(embeds.dtype).reshape(-1))
        positions = torch.arange(length, device=device).view(1, 1, -1).expand(3, b, -1)  # sequential, all 3 axes
        hidden = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).last_hidden_state
        at = (ids == self.reward_id).float().argmax(-1)
        return self.head(hidden[torch.arange(b, device=device), at].float())

    def score_texts(self, image_state: torch.Tensor, texts: list[str]) -> torch.Tensor:
        return self.mu_sigma(image_state, texts)[:, 0] / self.divisor


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0] if lines else type(e).__name__)[:200]


def _materialise_buffers(model) -> None:
    """Buffers outside the state dict (the rotary inverse frequencies) are left on the meta device by a meta build:
    take them from a fresh CPU instance of their module (built from the same config)."""
    for module in list(model.modules()):
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if meta:
            fresh = type(module)(module.config)
            for name in meta:
                setattr(module, name, getattr(fresh, name))
