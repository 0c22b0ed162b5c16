"""The settings of :mod:`directalign.methods.grpo`: ``grpo:`` (DanceGRPO / Flow-GRPO; the defaults are DanceGRPO's
FLUX settings, XueZeyue/DanceGRPO ``scripts/finetune/finetune_flux_grpo.sh``) and ``grpo_fast:`` (Flow-GRPO-Fast,
zhtmike/flow_grpo@3d02fd9 ``config/grpo.py`` and ``flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_fast.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..engine.config import choice, need


@dataclass
class GRPOConfig:
    """DanceGRPO / Flow-GRPO: SDE rollouts with per-step Gaussian log-probabilities (fp32), groups of
    ``group_size`` samples per prompt, group or per-prompt advantages, PPO-clipped ratio loss on a random
    ``timestep_fraction`` of the SDE steps, optional KL to the reference (base) model; one rollout feeds
    ``updates_per_rollout`` optimizer steps. The defaults are DanceGRPO's FLUX settings."""

    SECTION: ClassVar[str] = "grpo"

    sde: str = choice("dance", "flow")  # dance: diffusion g = eta (DanceGRPO flux_step) | flow: g = eta*sqrt(s/(1-s)) (Flow-GRPO)
    sampling_steps: int = 16  # DanceGRPO FLUX script
    # linspace: shift(linspace(1, 0, N + 1)) (DanceGRPO's sd3_time_shift) | diffusers: the SD3 scheduler's
    # set_timesteps(N) (Flow-GRPO's pipeline; flow.diffusers_sigma_schedule)
    schedule: str = choice("linspace", "diffusers")
    guidance: float = 3.5  # DanceGRPO hard-codes guidance 3.5 in its FLUX sampler
    eta: float = 0.3  # DanceGRPO --eta 0.3 (Flow-GRPO noise_level 0.7 SD3, 0.9 FLUX)
    group_size: int = 12  # DanceGRPO --num_generations 12
    same_initial_noise: bool = True  # DanceGRPO --init_same_noise; Flow-GRPO same_latent=False
    timestep_fraction: float = 0.6  # DanceGRPO --timestep_fraction 0.6
    clip_range: float = 1.0e-4  # both codes
    adv_clip_max: float = 5.0  # both codes
    advantage: str = choice("group", "per_prompt", "global_std")  # group: DanceGRPO | per_prompt/global_std: Flow-GRPO's tracker
    advantage_eps: float = 1.0e-8  # DanceGRPO (Flow-GRPO's stat tracker: 1e-4)
    drop_zero_advantage: bool = False  # Flow-GRPO drops samples whose advantage is exactly 0
    updates_per_rollout: int = 1  # optimizer steps per rollout (Flow-GRPO: 2)
    kl_beta: float = 0.0  # DanceGRPO: no KL; Flow-GRPO FLUX PickScore: beta 0 (SD3.5 configs 0.01-0.04)
    kl_form: str = choice("exact", "flow_grpo")  # exact Gaussian KL | flow_grpo's scale (divided by -dsigma)
    cfg_in_training: bool = True  # false: no CFG in rollouts and training forwards (true-CFG models only)
    sde_window_size: int = 0  # Flow-GRPO-Fast: SDE transitions per rollout (0: all N - 1)
    sde_window_range: list[int] = field(default_factory=lambda: [0, 0])  # [lo, hi]: window inside; hi 0: N - 1
    micro_batch: int = 0  # samples per differentiable forward (0: the whole part); gradient accumulation

    def window_range(self) -> tuple[int, int]:
        lo, hi = self.sde_window_range
        return lo, hi or self.sampling_steps - 1

    def validate(self) -> None:
        need(self.sampling_steps >= 2, f"{self.SECTION}.sampling_steps: must be >= 2 (the last step is deterministic), got "
             f"{self.sampling_steps}")
        need(self.eta > 0, f"{self.SECTION}.eta: must be > 0 (the SDE needs noise for a log-probability), got {self.eta}")
        need(self.group_size >= 2, f"{self.SECTION}.group_size: must be >= 2 (advantages are relative within a group), got "
             f"{self.group_size}")
        need(0 < self.timestep_fraction <= 1, f"{self.SECTION}.timestep_fraction: must be in (0, 1], got {self.timestep_fraction}")
        need(self.clip_range >= 0, f"{self.SECTION}.clip_range: must be >= 0, got {self.clip_range}")
        need(self.adv_clip_max > 0, f"{self.SECTION}.adv_clip_max: must be > 0, got {self.adv_clip_max}")
        need(self.advantage_eps > 0, f"{self.SECTION}.advantage_eps: must be > 0, got {self.advantage_eps}")
        need(self.kl_beta >= 0, f"{self.SECTION}.kl_beta: must be >= 0, got {self.kl_beta}")
        need(self.micro_batch >= 0, f"{self.SECTION}.micro_batch: must be >= 0 (0: whole batch), got {self.micro_batch}")
        need(self.updates_per_rollout >= 1, f"{self.SECTION}.updates_per_rollout: must be >= 1, got {self.updates_per_rollout}")
        need(self.sde_window_size >= 0, f"{self.SECTION}.sde_window_size: must be >= 0 (0: SDE everywhere), got "
             f"{self.sde_window_size}")
        lo, hi = self.window_range() if len(self.sde_window_range) == 2 else (-1, -1)
        need(0 <= lo and hi <= self.sampling_steps - 1 and hi - lo >= self.sde_window_size,
             f"{self.SECTION}.sde_window_range: need [lo, hi] with 0 <= lo, hi <= sampling_steps - 1 "
             f"({self.sampling_steps - 1}) and hi - lo >= sde_window_size ({self.sde_window_size}); got "
             f"{self.sde_window_range}")


@dataclass
class GRPOFastConfig(GRPOConfig):
    """Flow-GRPO-Fast: an ODE trajectory that branches into the SDE on ``sde_window_size`` consecutive transitions
    at a random start in ``sde_window_range`` and trains only those (zhtmike/flow_grpo@3d02fd9 ``pickscore_sd3_fast``
    settings on the tiny scale: 2-step window in the first half)."""

    SECTION: ClassVar[str] = "grpo_fast"

    sde: str = choice("flow", "dance")
    eta: float = 0.7  # Flow-GRPO noise_level (SD3)
    same_initial_noise: bool = False
    timestep_fraction: float = 1.0  # unused: the window's transitions are trained
    advantage: str = choice("per_prompt", "global_std", "group")
    advantage_eps: float = 1.0e-4
    drop_zero_advantage: bool = True
    updates_per_rollout: int = 2
    sde_window_size: int = 2
    sde_window_range: list[int] = field(default_factory=lambda: [0, 8])

    def validate(self) -> None:
        super().validate()
        need(self.sde_window_size >= 1, f"{self.SECTION}.sde_window_size: must be >= 1 (the branch's SDE steps; use "
             f"method grpo for a full SDE trajectory), got {self.sde_window_size}")
