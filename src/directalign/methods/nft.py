"""DiffusionNFT: online reinforcement learning on the forward (noising) process with implicit positive and negative
policies around an "old" policy that is an EMA of the trained one.

Source: Zheng et al. 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process", arXiv 2509.16117;
code ``NVlabs/DiffusionNFT@24af5554898d85e93efa492f42b5e9cdf4156e9b`` ``scripts/train_nft_sd3.py`` (loss: lines
908-978; rollouts with the ``old`` adapter: 640-659; old-policy update: 1034-1039 with ``return_decay``: 169-189)
and ``config/nft.py``. ``tests/data/nft_reference`` holds that loss computed by the code itself
(``tools/nft_reference.py``); ``tests/methods/test_nft.py`` checks :func:`nft_loss` and its gradient against it.

One optimizer step (diffusers convention: sigma = t = 1 is noise, ``x_t = (1 - t) x0 + t eps``, velocity ``v = eps -
x0``, so ``x0 = x_t - t v``):

1. the old policy's weights are moved towards the trained ones, ``old <- d * old + (1 - d) * theta`` with ``d =
   min(max(step - flat, 0) * rate, cap)`` (0 before ``flat``): :func:`old_decay` (the code's ``return_decay``,
   applied after each rollout epoch's optimizer step; here at the start of the next step, which sees the same
   weights). Before step 0 the old policy is a copy of the trained weights;
2. each prompt of the batch is repeated ``G = group_size`` times and rolled out with the **old** policy by the
   deterministic Euler ODE over ``rollout_steps`` steps, CFG-free (``guidance`` 1: one pass; FLUX.1-dev's guidance
   embedding is not CFG and keeps its value), decoded and scored without gradient (any reward works);
3. advantages ``A = (R - mean_group) / (std + eps)`` with the population std of every reward of the step
   (``global_std``, the code's ``PerPromptStatTracker(global_std=True)``) or of the group, clipped to
   ``+-adv_clip_max`` and mapped to ``r = clamp(A / adv_clip_max / 2 + 0.5, 0, 1)`` (:func:`optimality`);
4. per sample ``n = max(1, int(K * timestep_fraction))`` times t: the first n of a random permutation of the K
   rollout sigmas (``schedule``, as the code) or ``t ~ U(0, 1)`` (``uniform``); each with fresh noise, ``x_t`` is
   built from the generated clean latent and the loss :func:`nft_loss` is backpropagated, one share per timestep
   (and per ``micro_batch`` chunk), so the step's loss is the mean over samples and timesteps.

:func:`nft_loss` with ``v+ = beta v_theta + (1 - beta) v_old``, ``v- = (1 + beta) v_old - beta v_theta``,
``x0+- = x_t - t v+-``, adaptive weights ``w+- = stop_grad(mean |x0+- - x0|)`` (clipped below at 1e-5, computed in
float64 as the code does):

    loss = adv_clip_max * mean[(r |x0+ - x0|^2 / w+ + (1 - r) |x0- - x0|^2 / w-) / beta] + kl_beta mean|v_theta - v_ref|^2

(squared norms as per-sample means over elements). The factor ``adv_clip_max`` is the code's
``policy_loss = (ori_policy_loss * adv_clip_max).mean()`` (the paper's equation omits it); ``v_ref`` is the base
model (LoRA disabled, or a frozen copy made before full fine-tuning).

The old policy is a copy of the trainable weights (the LoRA tensors, or the whole transformer with full fine-tuning)
swapped into the model for its no-gradient passes; the code keeps a second peft adapter named ``old``, which computes
the same function. It is state across steps: :meth:`NFT.state_dict` / :meth:`NFT.load_state_dict` put it in every
checkpoint (``method.safetensors``), so a resumed run continues exactly.

Where we differ on purpose: the rollout is our Euler ODE (the code's SD3 config uses its 2nd-order ``dpm2``
deterministic solver; ``rollout_steps`` has the same meaning); one rollout feeds one optimizer step (the code's
pickscore / hpsv2 / geneval configs do the same, ``gradient_step_per_epoch=1``; its OCR config makes two); the
per-prompt statistics use this step's group only (the code's tracker is cleared every epoch: the same); with several
processes the global std is taken over every rank's rewards, as the code gathers them. The loss is computed in
float32 with the float64 weights cast to it (the code divides in float64).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..engine import distributed as dist_utils
from ..engine.config import choice, need
from ..engine.context import StepContext, StepOutput
from ..errors import TrainingError
from .base import Backward, BranchResult, MethodSpec, step_output
from .common import RewardScorer, schedule, step_noise, velocity_fn
from .matching import BaseReference
from .sampling import rollout

WEIGHT_MIN = 1e-5  # the code's .clip(min=0.00001) of the adaptive weights


@dataclass
class NFTConfig:
    """DiffusionNFT: CFG-free deterministic rollouts of the old (EMA) policy in groups, advantages mapped to an
    optimality probability r, forward-process loss on implicit positive / negative policies, small KL to the base."""

    rollout_steps: int = 10  # config.sample.num_steps = 10 (SD3.5-M)
    guidance: float = 1.0  # config.sample.guidance_scale = 1.0 (CFG-free); FLUX.1-dev: its guidance embedding value
    group_size: int = 24  # config.sample.num_image_per_prompt = 24
    same_initial_noise: bool = False  # the code draws each image's own noise
    beta: float = 1.0  # config.beta (0.1 for OCR)
    kl_beta: float = 1.0e-4  # config.train.beta
    adv_clip_max: float = 5.0  # config.train.adv_clip_max
    advantage_eps: float = 1.0e-4  # PerPromptStatTracker: std + 1e-4
    global_std: bool = True  # config.sample.global_std = True
    timestep_sampling: str = choice("schedule", "uniform")  # schedule: the rollout's sigmas (code) | uniform: U(0,1)
    timestep_fraction: float = 0.99  # config.train.timestep_fraction: int(10 * 0.99) = 9 timesteps per sample
    old_decay_flat: int = 0  # return_decay(decay_type=1): flat 0, uprate 0.001, uphold 0.5
    old_decay_rate: float = 0.001
    old_decay_max: float = 0.5
    micro_batch: int = 0  # samples per differentiable forward (0: the whole batch); gradient accumulation

    def validate(self) -> None:
        need(self.rollout_steps >= 1, f"nft.rollout_steps: must be >= 1, got {self.rollout_steps}")
        need(self.group_size >= 2, f"nft.group_size: must be >= 2 (advantages are relative within a group), got "
             f"{self.group_size}")
        need(self.beta > 0, f"nft.beta: must be > 0 (the loss divides by it), got {self.beta}")
        need(self.kl_beta >= 0, f"nft.kl_beta: must be >= 0, got {self.kl_beta}")
        need(self.adv_clip_max > 0, f"nft.adv_clip_max: must be > 0, got {self.adv_clip_max}")
        need(self.advantage_eps > 0, f"nft.advantage_eps: must be > 0, got {self.advantage_eps}")
        need(0 < self.timestep_fraction <= 1, f"nft.timestep_fraction: must be in (0, 1], got {self.timestep_fraction}")
        need(self.old_decay_flat >= 0, f"nft.old_decay_flat: must be >= 0, got {self.old_decay_flat}")
        need(self.old_decay_rate >= 0, f"nft.old_decay_rate: must be >= 0, got {self.old_decay_rate}")
        need(0 <= self.old_decay_max < 1, f"nft.old_decay_max: must be in [0, 1) (1 would freeze the old policy), "
             f"got {self.old_decay_max}")
        need(self.micro_batch >= 0, f"nft.micro_batch: must be >= 0 (0: whole batch), got {self.micro_batch}")


# --------------------------------------------------------------------------------------------- pure functions
def old_decay(step: int, flat: int, rate: float, cap: float) -> float:
    """The old policy's EMA decay after ``step`` optimizer steps: 0 before ``flat``, then ``min((step - flat) *
    rate, cap)`` (the code's ``return_decay``: type 0 = rate 0; type 1 = (0, 0.001, 0.5); type 2 = (75, 0.0075,
    0.999))."""
    return 0.0 if step < flat else min((step - flat) * rate, cap)


@torch.no_grad()
def ema_update(old: dict[str, torch.Tensor], current: dict[str, torch.Tensor], decay: float) -> None:
    """In place ``old[k] <- decay * old[k] + (1 - decay) * current[k]`` for every key."""
    for k, o in old.items():
        o.copy_(o * decay + current[k].detach().to(o.dtype) * (1.0 - decay))


def group_advantages(rewards: torch.Tensor, group_size: int, global_std: bool = True, eps: float = 1e-4
                     ) -> torch.Tensor:
    """``(R - mean_group) / (std + eps)`` over consecutive groups of ``group_size``; std is the population std of
    all rewards (``global_std``) or of each group (NumPy's ``np.std``, as the code's stat tracker)."""
    r = rewards.double().reshape(-1, group_size)
    std = r.std(unbiased=False) if global_std else r.std(dim=1, unbiased=False, keepdim=True)
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).reshape(rewards.shape).float()


def optimality(advantages: torch.Tensor, clip_max: float) -> torch.Tensor:
    """The advantage as an optimality probability: ``r = clamp(clip(A, +-c) / c / 2 + 0.5, 0, 1)``."""
    a = advantages.clamp(-clip_max, clip_max)
    return (a / clip_max / 2.0 + 0.5).clamp(0.0, 1.0)


def _per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, v_ref: torch.Tensor | None, x_t: torch.Tensor,
             x0: torch.Tensor, t: torch.Tensor, r: torch.Tensor, beta: float, kl_beta: float, scale: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's loss (module docstring), mean over the batch; returns it and its detached terms.

    ``v_theta`` (B, ...) carries the gradient; ``v_old``, ``v_ref`` (None: no KL) are detached; ``t`` and ``r`` are
    (B,); ``scale`` is the code's ``adv_clip_max`` factor. Terms: ``loss_pos`` / ``loss_neg`` (the two halves of the
    policy loss, with r, 1/beta and ``scale``; they sum to it), ``kl`` (mean |v_theta - v_ref|^2) and
    ``old_deviation`` (mean |v_theta - v_old|^2).
    """
    v_theta, v_old = v_theta.float(), v_old.detach().float()
    x_t, x0 = x_t.float(), x0.float()
    te = t.float().reshape(-1, *([1] * (x0.ndim - 1)))
    x0_pos = x_t - te * (beta * v_theta + (1 - beta) * v_old)
    x0_neg = x_t - te * ((1 + beta) * v_old - beta * v_theta)
    terms = {}
    losses = []
    for x0_hat in (x0_pos, x0_neg):
        with torch.no_grad():
            w = (x0_hat.double() - x0.double()).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
            w = w.clip(min=WEIGHT_MIN).to(x0_hat.dtype)
        losses.append(_per_sample((x0_hat - x0) ** 2 / w))
    r = r.float()
    pos = r * losses[0] / beta * scale
    neg = (1 - r) * losses[1] / beta * scale
    loss = (pos + neg).mean()
    terms["loss_pos"], terms["loss_neg"] = pos.mean().detach(), neg.mean().detach()
    terms["old_deviation"] = _per_sample((v_theta.detach() - v_old) ** 2).mean()
    kl = torch.zeros((), dtype=loss.dtype, device=loss.device)
    if v_ref is not None:
        kl = _per_sample((v_theta - v_ref.detach().float()) ** 2).mean()
        loss = loss + kl_beta * kl
    terms["kl"] = kl.detach()
    return loss, terms


# --------------------------------------------------------------------------------------------- the recipe
class NFT:
    """The DiffusionNFT recipe; ``cfg`` is a :class:`directalign.config.Config`."""

    def __init__(self, cfg, adapter, reward):
        self.cfg, self.adapter, self.reward = cfg, adapter, reward
        n = cfg.nft
        self.sigmas = schedule(n.rollout_steps, cfg.sampling.shift)
        self.score = RewardScorer(cfg, reward)
        # built before fine-tuning starts or a checkpoint loads: a full fine-tuning's copy holds the base weights (a
        # second transformer in memory, made only when the KL needs it)
        self._base = BaseReference(adapter, full=n.kl_beta > 0 and cfg.train.finetune == "full")
        self._old: dict[str, torch.Tensor] | None = None  # the old policy's copy of the trainable weights
        self._old_step = -1  # the step whose old-policy update has been applied

    # ------------------------------------------------------------------------------------------ state
    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        named = {k: p for k, p in self.adapter.transformer.named_parameters() if p.requires_grad}
        if not named:
            raise TrainingError("nft: the transformer has no trainable weights; set train.finetune=lora or full")
        return named

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The old policy's weights (whole tensors; every rank calls it under FSDP2), ``{}`` before step 0."""
        if self._old is None:
            return {}
        return {f"old.{k}": dist_utils.full_tensor(v).detach().cpu().clone() for k, v in self._old.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the old policy saved by :meth:`state_dict` (a resume); the trainable weights are loaded already."""
        named = self._trainable()
        old = {k[len("old."):]: v for k, v in state.items() if k.startswith("old.")}
        if set(old) != set(named):
            raise TrainingError("--resume: the checkpoint holds no DiffusionNFT old policy for these weights (it "
                                "was written by another method or LoRA setting); start a new run")
        self._old = {k: dist_utils.like_param(old[k], p).detach().clone() for k, p in named.items()}

    def _prepare_old(self, step: int) -> float:
        """Create (step 0: a copy of the weights) or update the old policy for ``step``; returns the decay used."""
        n = self.cfg.nft
        named = self._trainable()
        if self._old is None:
            self._old = {k: p.detach().clone() for k, p in named.items()}
            self._old_step = step
            return 0.0
        decay = old_decay(step, n.old_decay_flat, n.old_decay_rate, n.old_decay_max)
        if self._old_step != step:
            ema_update(self._old, named, decay)
            self._old_step = step
        return decay

    @contextlib.contextmanager
    def old_policy(self):
        """Within the block the trainable weights hold the old policy's values (no gradient)."""
        named = self._trainable()
        with torch.no_grad():
            saved = {k: p.detach().clone() for k, p in named.items()}
            for k, p in named.items():
                p.copy_(self._old[k])
        try:
            with torch.no_grad():
                yield
        finally:
            with torch.no_grad():
                for k, p in named.items():
                    p.copy_(saved[k])

    @contextlib.contextmanager
    def reference_model(self):
        """Within the block the adapter's transformer is the base model (LoRA off, or the frozen copy), no grad."""
        with self._base.active(), torch.no_grad():
            yield

    # ------------------------------------------------------------------------------------------ pieces
    def initial_noise(self, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B * G, ...) prompt-major: sample 0 of each group uses the engine's noise, the others repeat it
        (``same_initial_noise``) or draw their own from ``generator``."""
        n, m = self.cfg.nft, self.cfg.model
        rows = noise.repeat_interleave(n.group_size, dim=0)
        if n.same_initial_noise:
            return rows
        b = noise.shape[0]
        extra = self.adapter.noise(b * (n.group_size - 1), m.height, m.width, generator).to(noise)
        return torch.cat([noise[:, None], extra.reshape(b, n.group_size - 1, *noise.shape[1:])], 1).reshape(rows.shape)

    def timesteps(self, samples: int, generator: torch.Generator) -> torch.Tensor:
        """(samples, n_train) training times t (= sigma) per sample (module docstring, step 4), float32."""
        n = self.cfg.nft
        k = n.rollout_steps
        n_train = max(1, int(k * n.timestep_fraction))
        if n.timestep_sampling == "uniform":
            return torch.rand((samples, n_train), generator=generator, dtype=torch.float32)
        sig = self.sigmas[:-1].float()
        return torch.stack([sig[torch.randperm(k, generator=generator)[:n_train]] for _ in range(samples)])

    def _chunks(self, total: int):
        size = self.cfg.nft.micro_batch or total
        return [slice(s, min(s + size, total)) for s in range(0, total, size)]

    @torch.no_grad()
    def generate(self, embeds, noise: torch.Tensor) -> torch.Tensor:
        """The old policy's clean latents (float32) from ``noise`` by the Euler ODE, in micro-batches."""
        n, m = self.cfg.nft, self.cfg.model
        with self.old_policy():
            return torch.cat([rollout(self.adapter, embeds[c], noise[c], n.rollout_steps, self.cfg.sampling.shift,
                                      n.guidance, m.height, m.width).float()
                              for c in self._chunks(noise.shape[0])])

    def _rewards(self, x0: torch.Tensor, prompts: list[str], ctx: StepContext) -> torch.Tensor:
        m = self.cfg.model
        with torch.no_grad():
            images = self.adapter.decode(x0.to(self.adapter.dtype), m.height, m.width)
            return self.score(images, prompts, ctx.step, ctx.python_rng()).float().detach()

    def _advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        n = self.cfg.nft
        if n.global_std and torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            parts = [torch.empty_like(rewards) for _ in range(world)]
            torch.distributed.all_gather(parts, rewards.contiguous())
            everything = torch.cat(parts)  # every rank's groups, so the std is global as the code's
            adv = group_advantages(everything, n.group_size, True, n.advantage_eps)
            rank = torch.distributed.get_rank()
            return adv[rank * rewards.shape[0]:(rank + 1) * rewards.shape[0]]
        return group_advantages(rewards, n.group_size, n.global_std, n.advantage_eps)

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self, ctx: StepContext, backward: Backward) -> StepOutput:
        n, m = self.cfg.nft, self.cfg.model
        decay = self._prepare_old(ctx.step)
        named = self._trainable()
        drift = float(sum(((p.detach().float() - self._old[k].float()) ** 2).sum() for k, p in named.items())) ** 0.5
        generator = ctx.generator()
        noise = step_noise(self.adapter, ctx, m.height, m.width)
        prompts = [p for p in ctx.prompts for _ in range(n.group_size)]
        embeds = self.adapter.encode_prompts(prompts)
        x0 = self.generate(embeds, self.initial_noise(noise, generator))
        rewards = self._rewards(x0, prompts, ctx)
        adv = self._advantages(rewards)
        r = optimality(adv, n.adv_clip_max).to(x0.device)

        samples = x0.shape[0]
        times = self.timesteps(samples, generator).to(x0.device)  # (S, n_train)
        n_train = times.shape[1]
        chunks = self._chunks(samples)
        dtype = self.adapter.dtype
        vels = [velocity_fn(self.adapter, embeds[c], n.guidance, m.height, m.width) for c in chunks]

        def predict(vel, x, t):
            return vel(x.to(dtype), t.to(dtype)).float()

        total, sums = 0.0, {"loss_pos": 0.0, "loss_neg": 0.0, "kl": 0.0, "old_deviation": 0.0}
        for j in range(n_train):
            t = times[:, j]
            eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
            x_t = (1 - t.reshape(-1, *([1] * (x0.ndim - 1)))) * x0 + t.reshape(-1, *([1] * (x0.ndim - 1))) * eps
            with self.old_policy():
                v_old = torch.cat([predict(vel, x_t[c], t[c]) for c, vel in zip(chunks, vels)])
            v_ref = None
            if n.kl_beta > 0:
                with self.reference_model():
                    v_ref = torch.cat([predict(vel, x_t[c], t[c]) for c, vel in zip(chunks, vels)])
            for c, vel in zip(chunks, vels):
                loss, terms = nft_loss(predict(vel, x_t[c], t[c]), v_old[c], None if v_ref is None else v_ref[c],
                                       x_t[c], x0[c], t[c], r[c], n.beta, n.kl_beta, n.adv_clip_max)
                share = (c.stop - c.start) / samples / n_train
                backward(loss * share)
                total += float(loss.detach()) * share
                for key in sums:
                    sums[key] += float(terms[key]) * share
        extra = dict(sums, old_drift=drift, old_decay=decay, adv_abs=float(adv.abs().mean()),
                     zero_std_fraction=float((rewards.reshape(-1, n.group_size).std(dim=1) == 0).float().mean()))
        return step_output([BranchResult("nft", total, float(rewards.mean()), float(times.mean()), extra=extra)])

    def nfe(self, batch: int) -> dict[str, float]:
        """Per step and sample: K rollout calls and n_train old-policy calls (and n_train reference calls when
        ``kl_beta > 0``) without gradient, n_train calls with gradient."""
        n = self.cfg.nft
        samples = batch * n.group_size
        n_train = max(1, int(n.rollout_steps * n.timestep_fraction))
        no_grad = n.rollout_steps + n_train * (2 if n.kl_beta > 0 else 1)
        return {"nfe_no_grad": no_grad * samples, "nfe_grad": n_train * samples}


SPEC = MethodSpec("nft", "nft", NFTConfig, NFT,
                  "DiffusionNFT: old-policy ODE rollouts, forward-process loss on implicit +/- policies, EMA old")
