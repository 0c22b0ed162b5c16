"""The shared sections of a run configuration: model, reward, sampling, train, eval and run.

Each method adds exactly one section of its own (declared next to the method, see :mod:`directalign.methods`);
:mod:`directalign.config` assembles the whole configuration. Every field has the official SRPO setting or a
documented default; allowed values are declared next to the fields and each section validates itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config_parse import (ConfigError, build_section, check_section, choice, choices_of, coerce, deep_merge,  # noqa: F401
                           flat_diff, load_yaml, need, parse_override)

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # the values of model.dtype and reward.dtype (torch dtype names)


@dataclass
class ModelConfig:
    family: str = "flux"  # a registered model family (directalign.adapters.loading.FAMILIES)
    # "tiny-world" is the generator shipped with the package; otherwise a hub id or a local diffusers directory.
    path: str = "tiny-world"
    # weights dtype as loaded; under fine-tuning the trainable weights are kept in float32 whatever this says
    dtype: str = choice(*DTYPE_NAMES)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    height: int = 32
    width: int = 32
    max_sequence_length: int = 0  # 0: the tokenizer's own length, capped at 512
    # video families (wan): frames per video (Wan's VAE: 4k + 1) and, for Wan 2.2's two experts, which one trains
    # (high: sigma >= boundary_ratio, Wan 2.1's only one; low: below) and the low-noise expert's CFG scale when CFG is
    # on (the pipeline's guidance_scale_2; 0: the same scale). Image families ignore these.
    frames: int = 1
    trainable_expert: str = choice("high", "low")
    guidance_2: float = 0.0

    def validate(self) -> None:
        need(self.frames >= 1 and self.guidance_2 >= 0,
             f"model.frames must be >= 1 and model.guidance_2 >= 0, got {self.frames} and {self.guidance_2}")
        need(self.height >= 8 and self.width >= 8, f"model.height/width: must be >= 8, got {self.height}x{self.width}")
        need(0 <= self.max_sequence_length <= 512,
             f"model.max_sequence_length: must be in [0, 512], got {self.max_sequence_length}")
        need(bool(self.path), "model.path: empty; give 'tiny-world', a hub id or a local diffusers directory")


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

    def validate(self) -> None:
        n = len(self.kinds)
        need(len(self.paths) == n, f"reward.terms.paths: need one path per kind ({n}), got {len(self.paths)}")
        for key in ("weights", "means", "stds"):
            values = getattr(self, key)
            need(not values or len(values) == n,
                 f"reward.terms.{key}: need one value per kind ({n}) or an empty list, got {len(values)}")
        need(all(s > 0 for s in self.stds), f"reward.terms.stds: every std must be > 0, got {self.stds}")


@dataclass
class RewardConfig:
    # a registered reward kind (directalign.rewards.zoo documents what reward.path holds for each)
    kind: str = "tiny-world"
    path: str = "tiny-world"
    form: str = choice("official", "paper", "relative", "absolute")
    # SRPO control words; unset (null): the reward kind's defaults (directalign.rewards.control_words)
    positive_words: list[str] | None = None
    negative_words: list[str] | None = None
    selection: str = choice("round_robin", "random")  # round_robin (official) | random
    # k of the relative forms for methods without a k schedule of their own (SRPO takes k from srpo.discount_pos)
    relative_k: float = 0.175
    use_logit_scale: bool = False  # kind=clip: scale cos by logit_scale.exp() (kind=pickscore always does)
    divisor: float = 1.0  # every single-reward kind: score / divisor (PickScore in the official SRPO code: 20)
    tokenizer: str = ""  # text tokenizer when reward.path has none: hpsv2 from a .pt (default
    #                      laion/CLIP-ViT-H-14-laion2B-s32B-b79K), pickscore fallback (same), imagereward
    #                      (default bert-base-uncased)
    clip_backbone: str = "openai/clip-vit-large-patch14"  # aesthetic: the CLIP ViT-L/14 under the MLP head
    siglip_backbone: str = "google/siglip-so400m-patch14-384"  # aesthetic-v25: the SigLIP under the MLP head
    # clamp the resized image to [0, 1] before normalising (PIL-like); the official SRPO code does not
    clamp_resized: bool = True
    dtype: str = choice(*DTYPE_NAMES)  # reward weights
    terms: RewardTerms = field(default_factory=RewardTerms)  # kind=sum only

    def __post_init__(self) -> None:
        from ..rewards.control_words import default_control_words

        positive, negative = default_control_words(self.kind, self.terms.kinds)
        self.positive_words = positive if self.positive_words is None else self.positive_words
        self.negative_words = negative if self.negative_words is None else self.negative_words

    def validate(self) -> None:
        need(self.divisor > 0, f"reward.divisor: must be > 0, got {self.divisor}")
        if self.form != "absolute":
            need(bool(self.positive_words) and bool(self.negative_words),
                 f"reward.positive_words/negative_words: the {self.form!r} form needs both lists non-empty")


@dataclass
class SamplingConfig:
    """The model's sampling schedule, shared by every method and by evaluation: sigmas
    ``shift * t / (1 + (shift - 1) * t)`` of ``t = linspace(1, 0, steps + 1)`` (SD3's static shift)."""

    shift: float = 3.0  # FLUX.1-dev / official SRPO: 3

    def validate(self) -> None:
        need(self.shift > 0, f"sampling.shift: must be > 0, got {self.shift}")


@dataclass
class TrainConfig:
    steps: int = 20
    batch_size: int = 1  # prompts per step per process
    learning_rate: float = 5e-6
    weight_decay: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    grad_clip: float = 0.1
    lr_schedule: str = choice("constant", "cosine", "linear")
    warmup_steps: int = 0
    ema_decay: float = 0.0  # 0 disables EMA
    finetune: str = choice("lora", "full")
    # several ranks: auto (LoRA: replicate; full: fsdp) | replicate | fsdp (FSDP2)
    distributed: str = choice("auto", "replicate", "fsdp")
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)  # empty: the adapter's defaults
    gradient_checkpointing: bool = False
    vae_checkpointing: bool = False
    # bf16: the transformer computes in bf16, trainable weights stay float32
    mixed_precision: str = choice("no", "bf16")
    on_nonfinite: str = choice("skip", "abort")  # skip (log and skip the step) | abort
    seed: int = 42
    prompts: str = "tiny-world:train"  # tiny-world:train | path to .txt / .jsonl / .csv
    shuffle_prompts: bool = True  # the official code does not shuffle (DistributedSampler shuffle=False)
    # encode every prompt this session will read before its first step (the official code trains on embeddings
    # preprocessed offline): the text encoder's activations leave the steps, at the cost of holding every
    # embedding (FLUX: ~4 MB each at 512 T5 tokens); for small prompt sets
    precompute_prompts: bool = False

    def validate(self) -> None:
        need(self.steps >= 1, f"train.steps: must be >= 1, got {self.steps}")
        need(0 <= self.seed < 2**63, f"train.seed: must be in [0, 2^63), got {self.seed}")
        need(self.batch_size >= 1, f"train.batch_size: must be >= 1, got {self.batch_size}")
        need(self.learning_rate > 0, f"train.learning_rate: must be > 0, got {self.learning_rate}")
        need(self.weight_decay >= 0, f"train.weight_decay: must be >= 0, got {self.weight_decay}")
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
             f"train.adam_betas: need two numbers in [0, 1), got {self.adam_betas}")
        need(self.grad_clip >= 0, f"train.grad_clip: must be >= 0 (0 disables clipping), got {self.grad_clip}")
        need(self.warmup_steps >= 0, f"train.warmup_steps: must be >= 0, got {self.warmup_steps}")
        need(0 <= self.ema_decay < 1, f"train.ema_decay: must be in [0, 1), got {self.ema_decay}")
        need(self.lora_rank >= 1, f"train.lora_rank: must be >= 1, got {self.lora_rank}")
        need(not (self.distributed == "fsdp" and self.finetune == "lora"),
             "train.distributed=fsdp shards full fine-tuning; LoRA weights are replicated (they are a few MB): use "
             "train.distributed=auto or train.finetune=full")
        need(self.lora_alpha > 0, f"train.lora_alpha: must be > 0, got {self.lora_alpha}")
        need(0 <= self.lora_dropout < 1, f"train.lora_dropout: must be in [0, 1), got {self.lora_dropout}")


@dataclass
class EvalConfig:
    prompts: str = "tiny-world:heldout"
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    steps: int = 25
    guidance: float = 3.5
    best_of: int = 4  # the base model's best-of-n on the same prompts and seeds
    before: bool = True  # evaluate the base model too
    batch_size: int = 32

    def validate(self) -> None:
        need(bool(self.seeds), "eval.seeds: need at least one seed")
        need(all(0 <= x < 2**62 for x in self.seeds), f"eval.seeds: each seed must be in [0, 2^62), got {self.seeds}")
        need(self.steps >= 1, f"eval.steps: must be >= 1, got {self.steps}")
        need(self.best_of >= 1, f"eval.best_of: must be >= 1, got {self.best_of}")
        need(self.batch_size >= 1, f"eval.batch_size: must be >= 1, got {self.batch_size}")


@dataclass
class RunConfig:
    output_dir: str = "runs/srpo-tiny"
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False  # Weights & Biases (needs `pip install wandb`; WANDB_MODE=offline / disabled is respected)
    wandb_project: str = "directalign"
    sample_every: int = 0  # > 0: a held-out sample grid and reward point every N steps (samples/, heldout.jsonl)
    report: bool = True

    def validate(self) -> None:
        need(self.checkpoint_every >= 0, f"run.checkpoint_every: must be >= 0, got {self.checkpoint_every}")
        need(self.sample_every >= 0, f"run.sample_every: must be >= 0 (0: no samples during training), got "
                                     f"{self.sample_every}")
        need(bool(self.wandb_project.strip()) or not self.wandb,
             "run.wandb_project: empty; give a Weights & Biases project name or set run.wandb=false")
        need(self.keep_checkpoints >= 1, f"run.keep_checkpoints: must be >= 1, got {self.keep_checkpoints}")
        need(self.log_every >= 1, f"run.log_every: must be >= 1, got {self.log_every}")
        need(bool(self.output_dir), "run.output_dir: empty; give a directory for the run")


# The shared sections, in the order a resolved config.yaml lists them (the method's own section follows sampling).
SHARED_SECTIONS = {"model": ModelConfig, "reward": RewardConfig, "sampling": SamplingConfig, "train": TrainConfig,
                   "eval": EvalConfig, "run": RunConfig}
