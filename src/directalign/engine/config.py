"""Typed, validated run configuration: YAML file + ``--set key=value`` overrides.

Every field has the official SRPO setting or a documented default (srpo-method-notes sections 3 and 7). Unknown
keys, wrong types and out-of-range values raise :class:`ConfigError` with one line naming the key and what is
allowed. ``directalign train --print-config`` shows the resolved configuration.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A user error in a configuration: the message names the key and the fix."""


# ----------------------------------------------------------------------------------------------------- sections
@dataclass
class ModelConfig:
    family: str = "flux"
    # "tiny-world" is the generator shipped with the package; otherwise a hub id or a local diffusers directory.
    path: str = "tiny-world"
    dtype: str = "float32"  # weights dtype: float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    height: int = 32
    width: int = 32
    max_sequence_length: int = 0  # 0: the tokenizer's own length, capped at 512
    # A run of another model may continue from these weights only; resume checks it.


REWARD_TERM_KINDS = ("tiny-world", "clip", "pickscore", "hpsv2", "aesthetic", "aesthetic-v25", "imagereward")


@dataclass
class RewardTerms:
    """``reward.kind=sum``: term i is the raw score of ``kinds[i]`` loaded from ``paths[i]`` (pickscore:
    logit_scale.exp() * cos; hpsv2 / clip / tiny-world: cos; aesthetic / aesthetic-v25: the MLP's 1..10;
    imagereward: its normalised score), combined as ``sum_i weights[i] * (s_i - means[i]) / stds[i]``. Empty
    weights / means / stds lists mean 1 / 0 / 1 for every term (no normalisation); nothing is estimated from data."""

    kinds: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    means: list[float] = field(default_factory=list)
    stds: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.kinds)
        for kind in self.kinds:
            if kind not in REWARD_TERM_KINDS:
                raise ConfigError(f"reward.terms.kinds: {kind!r} is not allowed; choose from "
                                  f"{', '.join(REWARD_TERM_KINDS)}")
        if len(self.paths) != n:
            raise ConfigError(f"reward.terms.paths: need one path per kind ({n}), got {len(self.paths)}")
        for key in ("weights", "means", "stds"):
            values = getattr(self, key)
            if values and len(values) != n:
                raise ConfigError(f"reward.terms.{key}: need one value per kind ({n}) or an empty list, got "
                                  f"{len(values)}")
        if any(not s > 0 for s in self.stds):
            raise ConfigError(f"reward.terms.stds: every std must be > 0, got {self.stds}")


@dataclass
class RewardConfig:
    # tiny-world | clip (any transformers CLIPModel) | pickscore | hpsv2 | aesthetic | aesthetic-v25 | imagereward
    # | sum
    # (directalign.rewards.zoo documents what reward.path holds for each kind)
    kind: str = "tiny-world"
    path: str = "tiny-world"
    form: str = "official"  # official | paper | relative | absolute
    positive_words: list[str] = field(default_factory=lambda: ["textured"])
    negative_words: list[str] = field(default_factory=lambda: ["flat"])
    selection: str = "round_robin"  # round_robin (official) | random
    use_logit_scale: bool = False  # kind=clip: scale cos by logit_scale.exp() (kind=pickscore always does)
    divisor: float = 1.0  # every single-reward kind: score / divisor (PickScore in the official SRPO code: 20)
    tokenizer: str = ""  # text tokenizer when reward.path has none: hpsv2 from a .pt (default
    #                      laion/CLIP-ViT-H-14-laion2B-s32B-b79K), pickscore fallback (same), imagereward
    #                      (default bert-base-uncased)
    clip_backbone: str = "openai/clip-vit-large-patch14"  # aesthetic: the CLIP ViT-L/14 under the MLP head
    siglip_backbone: str = "google/siglip-so400m-patch14-384"  # aesthetic-v25: the SigLIP under the MLP head
    dtype: str = "float32"  # reward weights: float32 | bfloat16 | float16
    terms: RewardTerms = field(default_factory=RewardTerms)  # kind=sum only


@dataclass
class SRPOConfig:
    rollout_steps: int = 25  # official sampling_steps
    shift: float = 3.0  # official; SD3-style s*t/(1+(s-1)t)
    rollout_guidance: float = 1.0  # official HPS script (PickScore script: 2)
    train_guidance: float = 3.5  # official hard-codes 3.5 in the differentiable forward
    noise_prior: str = "rollout"  # rollout (official: the rollout's own initial noise) | fresh
    share_noise_across_ranks: bool = True  # official broadcasts rank 0's noise; false: each rank its own slice
    share_window_across_ranks: bool = False  # official draws m per rank (seed + rank); true: one m for all ranks
    schedule_steps: int = 50  # the inference schedule t0/t1 index into (official vis_sampling_step)
    window: list[int] = field(default_factory=lambda: [5, 25])  # official train_timestep (HPS script)
    grid_points: int = 1000  # official timestep_length
    groundtruth_ratio: float = 0.9  # official; model share Delta-sigma ~ 0.0215 on the HPS window
    window_margin: int = 5  # m ~ U{margin, N - margin - 1}
    denoise_branch: bool = True
    inversion_branch: bool = True
    discount_mode: str = "k"  # k (official FLUX: k in (1+k)pos - neg) | multiplicative (Qwen code)
    discount_pos: list[float] = field(default_factory=lambda: [0.1, 0.25])
    discount_inv: list[float] = field(default_factory=lambda: [0.3, 0.01])
    multiplicative_shift: float = 3.0
    loss: str = "hinge"  # hinge relu(tau - r) (official, after ReFL) | linear -r
    hinge_threshold: float = 0.7
    quantize_timestep: int = 1000  # official int(sigma*1000)/1000; 0 = off
    samples_per_rollout: int = 1  # Direct-Align draws per branch from one rollout
    offline_data: str = ""  # folder of images with captions (or a jsonl manifest); empty = online
    offline_until_step: int = -1  # switch to online rollouts at this step; -1 = offline for the whole run


# ---------------------------------------------------------------------------------- baseline methods (issue 6)
# Every baseline samples on the schedule ``shift(linspace(1, 0, steps + 1))`` with ``srpo.shift`` (the model's
# schedule shift, shared with evaluation), and scores with ``reward.form`` (``absolute`` in every shipped baseline
# config, as in the SRPO paper's Table 1; a relative form uses the control words with k = the evaluation's k).
@dataclass
class ReFLConfig:
    """ReFL (Xu et al. 2023, ImageReward): no-grad ODE rollout to a random late step k, one differentiable model
    call there, one-step x0 prediction ``x_k - sigma_k * v``, decode, reward, ``relu(threshold - r)``."""

    rollout_steps: int = 25  # SRPO paper: 25 rollout steps for its direct-propagation baselines
    guidance: float = 3.5  # FLUX.1-dev guidance embedding, rollout and differentiable call
    step_range: list[int] = field(default_factory=lambda: [19, 24])  # k ~ U{lo..hi} on the rollout schedule;
    #   ImageReward's ReFL.py: randint(30, 39) of 40 steps, scaled to 25 steps
    loss: str = "hinge"  # hinge relu(threshold - r) | linear -r
    hinge_threshold: float = 0.7  # SRPO code's HPS-scale threshold; ImageReward used 2 on its own score scale
    loss_scale: float = 1.0  # ImageReward's ReFL.py multiplies the loss by grad_scale = 1e-3


@dataclass
class DRaFTConfig:
    """DRaFT (Clark et al. 2023, arXiv 2309.17400). ``method: draft-k`` backpropagates through the last ``k``
    sampler steps; ``method: draft-lv`` samples without gradient, re-noises the final sample ``lv_samples`` times to
    the last step's sigma and averages the one-step-denoise gradients."""

    sampling_steps: int = 25
    guidance: float = 3.5
    k: int = 1  # draft-k: differentiable last steps
    lv_samples: int = 2  # draft-lv: re-noised copies n
    checkpoint: bool = True  # torch.utils.checkpoint around each differentiable step (draft-k with k > 1)
    loss: str = "linear"  # DRaFT maximises the reward: -r | hinge
    hinge_threshold: float = 0.7


@dataclass
class AlignPropConfig:
    """AlignProp (Prabhudesai et al. 2023, arXiv 2310.03739): backpropagation through the whole sampling chain with
    per-step gradient checkpointing and randomised truncation: model calls before a random step index b get no
    gradient (AlignProp's ``if i < backprop_timestep: noise_pred = noise_pred.detach()``)."""

    sampling_steps: int = 25
    guidance: float = 3.5
    truncation: str = "gaussian"  # gaussian | uniform | fixed (AlignProp's backprop_strategy)
    gaussian: list[float] = field(default_factory=lambda: [21.0, 2.5])  # b ~ round(N(mean, std)); AlignProp:
    #   (42, 5) of 50 steps, scaled to 25
    uniform: list[int] = field(default_factory=lambda: [15, 24])  # b ~ U{lo..hi}; AlignProp: (30, 50) of 50
    fixed: int = 24  # AlignProp: 49 of 50 (one differentiable step)
    checkpoint: bool = True
    loss: str = "linear"  # -r | hinge
    hinge_threshold: float = 0.7


@dataclass
class GRPOConfig:
    """DanceGRPO / Flow-GRPO: SDE rollouts with per-step Gaussian log-probabilities (fp32), groups of
    ``group_size`` samples per prompt, group-normalised advantages, PPO-clipped ratio loss on a random
    ``timestep_fraction`` of the SDE steps, optional KL to the reference (base) model."""

    sde: str = "dance"  # dance: diffusion g = eta (DanceGRPO flux_step) | flow: g = eta*sqrt(s/(1-s)) (Flow-GRPO)
    sampling_steps: int = 16  # DanceGRPO FLUX script
    guidance: float = 3.5  # DanceGRPO hard-codes guidance 3.5 in its FLUX sampler
    eta: float = 0.3  # DanceGRPO --eta 0.3 (Flow-GRPO noise_level 0.7 default, 0.9 in its FLUX PickScore config)
    group_size: int = 12  # DanceGRPO --num_generations 12
    same_initial_noise: bool = True  # DanceGRPO --init_same_noise; Flow-GRPO same_latent=False
    timestep_fraction: float = 0.6  # DanceGRPO --timestep_fraction 0.6
    clip_range: float = 1.0e-4  # both codes
    adv_clip_max: float = 5.0  # both codes
    advantage_eps: float = 1.0e-8  # DanceGRPO (Flow-GRPO's stat tracker: 1e-4)
    kl_beta: float = 0.0  # DanceGRPO: no KL; Flow-GRPO FLUX PickScore: beta 0 (SD3.5 configs 0.01-0.04)
    micro_batch: int = 0  # samples per differentiable forward (0: the whole batch); gradient accumulation


@dataclass
class TrainConfig:
    steps: int = 20
    batch_size: int = 1  # prompts per step per process
    learning_rate: float = 5e-6
    weight_decay: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    grad_clip: float = 0.1
    lr_schedule: str = "constant"  # constant | cosine | linear
    warmup_steps: int = 0
    ema_decay: float = 0.0  # 0 disables EMA
    finetune: str = "lora"  # lora | full
    distributed: str = "auto"  # several ranks: auto (LoRA: replicate; full: fsdp) | replicate | fsdp (FSDP2)
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)  # empty: the adapter's defaults
    gradient_checkpointing: bool = False
    vae_checkpointing: bool = False
    mixed_precision: str = "no"  # no | bf16: transformer computes in bf16, weights keep model.dtype
    on_nonfinite: str = "skip"  # skip (log and skip the step) | abort
    seed: int = 42
    prompts: str = "tiny-world:train"  # tiny-world:train | path to .txt / .jsonl / .csv
    shuffle_prompts: bool = True  # the official code does not shuffle (DistributedSampler shuffle=False)


@dataclass
class EvalConfig:
    prompts: str = "tiny-world:heldout"
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 25
    guidance: float = 3.5
    best_of: int = 4  # the base model's best-of-n on the same prompts and seeds
    before: bool = True  # evaluate the base model too
    batch_size: int = 32


@dataclass
class RunConfig:
    output_dir: str = "runs/srpo-tiny"
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = False
    report: bool = True


@dataclass
class Config:
    method: str = "srpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    srpo: SRPOConfig = field(default_factory=SRPOConfig)
    refl: ReFLConfig = field(default_factory=ReFLConfig)
    draft: DRaFTConfig = field(default_factory=DRaFTConfig)
    alignprop: AlignPropConfig = field(default_factory=AlignPropConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


CHOICES: dict[str, tuple] = {
    "method": ("srpo", "direct-align", "refl", "draft-k", "draft-lv", "alignprop", "grpo"),
    "refl.loss": ("hinge", "linear"),
    "draft.loss": ("hinge", "linear"),
    "alignprop.loss": ("hinge", "linear"),
    "alignprop.truncation": ("gaussian", "uniform", "fixed"),
    "grpo.sde": ("dance", "flow"),
    "model.family": ("flux", "sd3", "qwen-image"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "reward.kind": ("tiny-world", "clip", "pickscore", "hpsv2", "aesthetic", "aesthetic-v25", "imagereward", "sum"),
    "reward.form": ("official", "paper", "relative", "absolute"),
    "reward.selection": ("round_robin", "random"),
    "srpo.noise_prior": ("rollout", "fresh"),
    "srpo.discount_mode": ("k", "multiplicative"),
    "srpo.loss": ("hinge", "linear"),
    "train.lr_schedule": ("constant", "cosine", "linear"),
    "train.finetune": ("lora", "full"),
    "train.distributed": ("auto", "replicate", "fsdp"),
    "train.mixed_precision": ("no", "bf16"),
    "train.on_nonfinite": ("skip", "abort"),
}


# ----------------------------------------------------------------------------------------------------- parsing
_YAML11_FLOAT_GAP = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _coerce(value, tp, key: str):
    """Check and convert one value to the annotated type; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT_GAP.match(value.strip()):
            # PyYAML (YAML 1.1) reads exponent floats without a dot, such as 1e-3, as strings
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except OverflowError:  # an integer beyond float range
            out = math.inf
        if not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, bool) and ("yes" if value else "no") in CHOICES.get(key, ()):
            return "yes" if value else "no"  # YAML 1.1 reads an unquoted no / yes (train.mixed_precision) as a bool
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}'; allowed keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key)
        else:
            kwargs[name] = _coerce(data[name], tp, key)
    return cls(**kwargs)


def _deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """``"srpo.window=[10,25]"`` -> ``{"srpo": {"window": [10, 25]}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.steps=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key is empty or malformed")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: dict = {}
    cur = node
    parts = key.split(".")
    for part in parts[:-1]:
        cur[part] = {}
        cur = cur[part]
    cur[parts[-1]] = value
    return node


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text; save it as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}; fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections (model:, reward:, srpo:, ...)")
    return data


def build_config(data: dict | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- data <- each ``key=value`` override, then validation."""
    merged = dict(data or {})
    for text in overrides or []:
        merged = _deep_merge(merged, parse_override(text))
    cfg = _build(Config, merged, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    return build_config(load_yaml(path) if path else {}, overrides)


# --------------------------------------------------------------------------------------------------- validation
def _get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    t, s, m, r, e, run = cfg.train, cfg.srpo, cfg.model, cfg.reward, cfg.eval, cfg.run
    need(t.steps >= 1, f"train.steps: must be >= 1, got {t.steps}")
    need(0 <= t.seed < 2**63, f"train.seed: must be in [0, 2^63), got {t.seed}")
    need(t.batch_size >= 1, f"train.batch_size: must be >= 1, got {t.batch_size}")
    need(t.learning_rate > 0, f"train.learning_rate: must be > 0, got {t.learning_rate}")
    need(t.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {t.weight_decay}")
    need(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas),
         f"train.adam_betas: need two numbers in [0, 1), got {t.adam_betas}")
    need(t.grad_clip >= 0, f"train.grad_clip: must be >= 0 (0 disables clipping), got {t.grad_clip}")
    need(t.warmup_steps >= 0, f"train.warmup_steps: must be >= 0, got {t.warmup_steps}")
    need(0 <= t.ema_decay < 1, f"train.ema_decay: must be in [0, 1), got {t.ema_decay}")
    need(t.lora_rank >= 1, f"train.lora_rank: must be >= 1, got {t.lora_rank}")
    need(not (t.distributed == "fsdp" and t.finetune == "lora"),
         "train.distributed=fsdp shards full fine-tuning; LoRA weights are replicated (they are a few MB): use "
         "train.distributed=auto or train.finetune=full")
    need(t.lora_alpha > 0, f"train.lora_alpha: must be > 0, got {t.lora_alpha}")
    need(0 <= t.lora_dropout < 1, f"train.lora_dropout: must be in [0, 1), got {t.lora_dropout}")
    need(m.height >= 8 and m.width >= 8, f"model.height/width: must be >= 8, got {m.height}x{m.width}")
    need(m.max_sequence_length >= 0 and m.max_sequence_length <= 512,
         f"model.max_sequence_length: must be in [0, 512], got {m.max_sequence_length}")
    need(bool(m.path), "model.path: empty; give 'tiny-world', a hub id or a local diffusers directory")
    need(r.divisor > 0, f"reward.divisor: must be > 0, got {r.divisor}")
    if r.form != "absolute":
        need(bool(r.positive_words) and bool(r.negative_words),
             f"reward.positive_words/negative_words: the {r.form!r} form needs both lists non-empty")
    need(s.rollout_steps >= 1, f"srpo.rollout_steps: must be >= 1, got {s.rollout_steps}")
    need(s.shift > 0, f"srpo.shift: must be > 0, got {s.shift}")
    need(s.schedule_steps >= 2, f"srpo.schedule_steps: must be >= 2, got {s.schedule_steps}")
    need(len(s.window) == 2, f"srpo.window: need two indices [t0, t1], got {s.window}")
    t0, t1 = s.window
    need(0 <= t0 < t1 <= s.schedule_steps,
         f"srpo.window: need 0 <= t0 < t1 <= srpo.schedule_steps ({s.schedule_steps}), got [{t0}, {t1}]")
    need(t0 >= 1, "srpo.window: t0 = 0 trains at sigma = 1 (pure noise), which cannot be recovered; use t0 >= 1")
    need(0 <= s.groundtruth_ratio < 1, f"srpo.groundtruth_ratio: must be in [0, 1), got {s.groundtruth_ratio}")
    need(s.window_margin >= 1, f"srpo.window_margin: must be >= 1, got {s.window_margin}")
    need(s.grid_points >= 2 * s.window_margin + 2,
         f"srpo.grid_points: must be >= 2 * window_margin + 2 = {2 * s.window_margin + 2}, got {s.grid_points}")
    need(s.denoise_branch or s.inversion_branch,
         "srpo.denoise_branch/inversion_branch: both are off; enable at least one")
    need(len(s.discount_pos) == 2 and len(s.discount_inv) == 2,
         "srpo.discount_pos/discount_inv: need [start, end] pairs")
    need(s.multiplicative_shift > 0, f"srpo.multiplicative_shift: must be > 0, got {s.multiplicative_shift}")
    need(s.hinge_threshold > -1e9, "srpo.hinge_threshold: must be a finite number")
    need(s.quantize_timestep >= 0, f"srpo.quantize_timestep: must be >= 0, got {s.quantize_timestep}")
    need(s.samples_per_rollout >= 1, f"srpo.samples_per_rollout: must be >= 1, got {s.samples_per_rollout}")
    need(s.offline_until_step >= -1, f"srpo.offline_until_step: must be >= -1, got {s.offline_until_step}")
    _validate_baselines(cfg, need)
    need(bool(e.seeds), "eval.seeds: need at least one seed")
    need(all(0 <= x < 2**62 for x in e.seeds), f"eval.seeds: each seed must be in [0, 2^62), got {e.seeds}")
    need(e.steps >= 1, f"eval.steps: must be >= 1, got {e.steps}")
    need(e.best_of >= 1, f"eval.best_of: must be >= 1, got {e.best_of}")
    need(e.batch_size >= 1, f"eval.batch_size: must be >= 1, got {e.batch_size}")
    need(run.checkpoint_every >= 0, f"run.checkpoint_every: must be >= 0, got {run.checkpoint_every}")
    need(run.keep_checkpoints >= 1, f"run.keep_checkpoints: must be >= 1, got {run.keep_checkpoints}")
    need(run.log_every >= 1, f"run.log_every: must be >= 1, got {run.log_every}")
    need(bool(run.output_dir), "run.output_dir: empty; give a directory for the run")


def _validate_baselines(cfg: Config, need) -> None:
    """The baseline methods' sections (checked whatever the method, so a config stays valid when it switches)."""
    r, d, a, g = cfg.refl, cfg.draft, cfg.alignprop, cfg.grpo
    need(r.rollout_steps >= 1, f"refl.rollout_steps: must be >= 1, got {r.rollout_steps}")
    need(len(r.step_range) == 2 and 0 <= r.step_range[0] <= r.step_range[1] < r.rollout_steps,
         f"refl.step_range: need [lo, hi] with 0 <= lo <= hi < refl.rollout_steps ({r.rollout_steps}), got "
         f"{r.step_range}")
    need(r.loss_scale > 0, f"refl.loss_scale: must be > 0, got {r.loss_scale}")
    need(d.sampling_steps >= 1, f"draft.sampling_steps: must be >= 1, got {d.sampling_steps}")
    need(1 <= d.k <= d.sampling_steps, f"draft.k: must be in [1, draft.sampling_steps = {d.sampling_steps}], "
         f"got {d.k}")
    need(d.lv_samples >= 1, f"draft.lv_samples: must be >= 1, got {d.lv_samples}")
    need(a.sampling_steps >= 1, f"alignprop.sampling_steps: must be >= 1, got {a.sampling_steps}")
    # only the selected truncation strategy's setting must fit the sampling steps
    if a.truncation == "gaussian":
        need(len(a.gaussian) == 2 and a.gaussian[1] >= 0,
             f"alignprop.gaussian: need [mean, std] with std >= 0, got {a.gaussian}")
    elif a.truncation == "uniform":
        need(len(a.uniform) == 2 and 0 <= a.uniform[0] <= a.uniform[1] < a.sampling_steps,
             f"alignprop.uniform: need [lo, hi] with 0 <= lo <= hi < alignprop.sampling_steps "
             f"({a.sampling_steps}), got {a.uniform}")
    else:
        need(0 <= a.fixed < a.sampling_steps, f"alignprop.fixed: must be in [0, alignprop.sampling_steps - 1 = "
             f"{a.sampling_steps - 1}], got {a.fixed}")
    need(g.sampling_steps >= 2, f"grpo.sampling_steps: must be >= 2 (the last step is deterministic), got "
         f"{g.sampling_steps}")
    need(g.eta > 0, f"grpo.eta: must be > 0 (the SDE needs noise for a log-probability), got {g.eta}")
    need(g.group_size >= 2, f"grpo.group_size: must be >= 2 (advantages are relative within a group), got "
         f"{g.group_size}")
    need(0 < g.timestep_fraction <= 1, f"grpo.timestep_fraction: must be in (0, 1], got {g.timestep_fraction}")
    need(g.clip_range >= 0, f"grpo.clip_range: must be >= 0, got {g.clip_range}")
    need(g.adv_clip_max > 0, f"grpo.adv_clip_max: must be > 0, got {g.adv_clip_max}")
    need(g.advantage_eps > 0, f"grpo.advantage_eps: must be > 0, got {g.advantage_eps}")
    need(g.kl_beta >= 0, f"grpo.kl_beta: must be >= 0, got {g.kl_beta}")
    need(g.micro_batch >= 0, f"grpo.micro_batch: must be >= 0 (0: whole batch), got {g.micro_batch}")
    if cfg.method not in ("srpo", "direct-align"):
        need(not cfg.srpo.offline_data, f"srpo.offline_data: offline real-image training is an SRPO mode; "
             f"method {cfg.method} samples its own images (clear srpo.offline_data)")


def diff_from_defaults(cfg: Config) -> dict:
    """Flattened ``{"a.b": value}`` of every setting that differs from the defaults (for logs)."""
    out: dict = {}

    def walk(a, b, prefix):
        for f in dataclasses.fields(a):
            va, vb = getattr(a, f.name), getattr(b, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(va):
                walk(va, vb, key + ".")
            elif va != vb:
                out[key] = va

    walk(cfg, Config(), "")
    return out
