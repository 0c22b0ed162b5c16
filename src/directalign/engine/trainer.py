"""The training engine: setup, the step loop, checkpoints, resume, logging, evaluation and export.

It knows no method internals: the method object exposes ``accumulate_gradients`` (runs the differentiable passes
of one step and calls backward) and ``nfe``. Every random draw of step ``t`` comes from generators seeded with
``(seed, rank, t)``, and the prompt order is a pure function of ``(seed, epoch)``, so a run resumed at step k
replays exactly what an uninterrupted run does.
"""

from __future__ import annotations

import copy
import json
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from . import checkpoint as ckpt
from . import precision
from .config import Config


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------- helpers
def seed_for(seed: int, rank: int, step: int, stream: int = 0) -> int:
    """A well-mixed 63-bit seed for (seed, rank, step, stream)."""
    x = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + step * 0x94D049BB133111EB + stream * 0x2545F491)
    x &= (1 << 64) - 1
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    x ^= x >> 32
    return x & ((1 << 63) - 1)


class PromptSampler:
    """Batch ``step`` of rank ``rank``: epochs are seeded permutations (or the file order), sharded by rank.

    ``items`` may be prompts or indices (offline mode samples image indices the same way).
    """

    def __init__(self, items: list, batch_size: int, seed: int, shuffle: bool, rank: int = 0,
                 world_size: int = 1):
        self.prompts, self.batch_size, self.seed, self.shuffle = items, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size

    def _order(self, epoch: int) -> list[int]:
        n = len(self.prompts)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(seed_for(self.seed, 0, epoch, stream=7))
        return torch.randperm(n, generator=g).tolist()

    def position(self, step: int, slot: int) -> tuple[int, int]:
        """(epoch, index in the epoch's order) of the ``slot``-th prompt of ``step`` for this rank."""
        flat = (step * self.world_size + self.rank) * self.batch_size + slot
        return divmod(flat, len(self.prompts))

    def batch(self, step: int) -> list[str]:
        out = []
        for slot in range(self.batch_size):
            epoch, i = self.position(step, slot)
            out.append(self.prompts[self._order(epoch)[i]])
        return out


def lr_lambda(schedule: str, warmup: int, total: int):
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1 + math.cos(math.pi * progress))

    return f


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"model.device={name!r} but no CUDA device is available; use model.device=cpu")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------------- loading
def load_adapter(cfg: Config, device: torch.device):
    """The generator of ``model.family`` (flux | sd3 | qwen-image) from ``model.path`` (tiny-world, a hub id or a
    local diffusers directory), with ``model.dtype`` on ``device``."""
    from ..adapters.flux import FluxAdapter
    from ..adapters.loading import FAMILIES, check_model_dir

    m = cfg.model
    path = m.path
    if path == "tiny-world":
        if m.family != "flux":
            raise TrainingError(f"model.path=tiny-world is a FLUX-family model, but model.family={m.family}; set "
                                "model.family=flux or point model.path at a model of that family")
        from ..world.load import load_pipeline

        pipe = load_pipeline(DTYPES[m.dtype]).to(device)
        return FluxAdapter(pipe, m.max_sequence_length or None)
    family = FAMILIES[m.family]
    p = Path(path).expanduser()
    if path.startswith((".", "/", "~")) or p.exists():
        if not (p / "model_index.json").is_file():
            raise TrainingError(f"model.path {path!r} is not a diffusers model directory (no model_index.json); "
                                "give a directory saved with save_pretrained or a hub id")
        try:
            check_model_dir(p, m.family)
        except ValueError as e:
            raise TrainingError(f"model.path: {e}") from None
        path = str(p)
    try:
        return family.adapter_class().from_pretrained(path, dtype=DTYPES[m.dtype], device=str(device),
                                                      max_sequence_length=m.max_sequence_length or None)
    except (OSError, ValueError) as e:
        raise TrainingError(f"could not load model.path {path!r} as a {family.pipeline}: "
                            f"{str(e).splitlines()[0]}") from None
    except TypeError as e:  # diffusers builds the modules from config.json: a value of the wrong type lands here
        raise TrainingError(f"could not load model.path {path!r} as a {family.pipeline}: a value in one of its "
                            f"config.json files has the wrong type ({str(e).splitlines()[0]}); fix that file or "
                            "re-save the model with save_pretrained") from None


def load_reward(cfg: Config, device: torch.device):
    """The frozen reward of ``reward.kind`` (see :mod:`directalign.rewards.zoo`) on ``device``."""
    from ..rewards.zoo import reward_from_config

    r = cfg.reward
    try:
        reward = reward_from_config(r)
    except (OSError, ValueError, TypeError) as e:  # TypeError: a config.json value of the wrong type
        where = "reward.terms.paths" if r.kind == "sum" else f"reward.path {r.path!r}"
        raise TrainingError(f"could not load {where} as reward.kind={r.kind}: {str(e).splitlines()[0]}") from None
    form = "absolute" if cfg.method == "direct-align" else r.form
    if form != "absolute" and not reward.text_conditioned:
        raise TrainingError(f"reward.kind={r.kind} is image-only, so the {form!r} SRPO form has no text to "
                            "contrast; set reward.form=absolute")
    return reward.to(device)


def make_method(cfg: Config, adapter, reward):
    """The recipe of ``cfg.method``: srpo / direct-align (methods.srpo), refl, draft-k / draft-lv, alignprop, grpo."""
    if cfg.method in ("srpo", "direct-align"):
        from ..methods.srpo import SRPO

        return SRPO(cfg, adapter, reward)
    if cfg.method == "refl":
        from ..methods.refl import ReFL

        return ReFL(cfg, adapter, reward)
    if cfg.method in ("draft-k", "draft-lv"):
        from ..methods.draft import DRaFT

        return DRaFT(cfg, adapter, reward)
    if cfg.method == "alignprop":
        from ..methods.alignprop import AlignProp

        return AlignProp(cfg, adapter, reward)
    if cfg.method == "grpo":
        from ..methods.grpo import GRPO

        return GRPO(cfg, adapter, reward)
    raise TrainingError(f"method {cfg.method!r} has no recipe")


def apply_finetune_mode(cfg: Config, adapter) -> list[torch.nn.Parameter]:
    """LoRA (peft) or full fine-tuning of the transformer; everything else frozen. Returns the trainable params."""
    t = cfg.train
    transformer = adapter.transformer
    transformer.requires_grad_(False)
    if t.finetune == "lora":
        from peft import LoraConfig

        targets = list(t.lora_targets) or _present_targets(transformer, adapter.lora_target_modules)
        transformer.add_adapter(LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                                           target_modules=targets, init_lora_weights=True))
    else:
        transformer.requires_grad_(True)
    if t.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if t.vae_checkpointing:
        # some VAEs (Qwen-Image's) do not support diffusers' flag; their adapter provides its own
        enable = getattr(adapter, "enable_vae_checkpointing", adapter.vae.enable_gradient_checkpointing)
        enable()
    transformer.train()
    return [p for p in transformer.parameters() if p.requires_grad]


def _present_targets(module: torch.nn.Module, candidates) -> list[str]:
    names = [n for n, _ in module.named_modules()]
    return [c for c in candidates if any(n == c or n.endswith("." + c) for n in names)]


def trainable_state(cfg: Config, transformer) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds: the LoRA adapter (peft keys) or the whole transformer."""
    if cfg.train.finetune == "lora":
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(transformer)
    return transformer.state_dict()


def unsharded(cls, sharded, weights: dict[str, torch.Tensor]):
    """A plain ``cls`` module (the transformer's class before FSDP2 wrapped it) holding ``weights``."""
    module = cls.from_config(sharded.config)
    module.load_state_dict(weights)
    return module.to(device=sharded.device, dtype=sharded.dtype).eval().requires_grad_(False)


def load_trainable_state(cfg: Config, transformer, state: dict[str, torch.Tensor], fsdp: bool = False) -> None:
    if cfg.train.finetune == "lora":
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(transformer, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise TrainingError(f"checkpoint holds weights this model does not have ({unexpected[0]}); it belongs "
                                "to another model or LoRA setting")
    elif fsdp:
        from .distributed import load_full_model_state

        try:
            load_full_model_state(transformer, state)
        except (KeyError, RuntimeError):
            raise TrainingError("checkpoint weights do not match this transformer; it belongs to another model") \
                from None
    else:
        missing, unexpected = transformer.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise TrainingError("checkpoint weights do not match this transformer; it belongs to another model")


# ---------------------------------------------------------------------------------------------------- the run
@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    adapter: object = None
    metrics: list[dict] = field(default_factory=list)

    def pipeline(self):
        """The fine-tuned diffusers pipeline (LoRA active or full weights), ready to generate."""
        return self.adapter.pipe


class StoppedBySignal(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run after a checkpoint of the last finished step was written."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint written; "
                         "continue with --resume")
        self.signum, self.step = signum, step


class _StopFlag:
    """First SIGINT/SIGTERM: finish the current step, write a checkpoint and stop. A second one stops at once (the
    previous complete checkpoint stays; a partial one is never loaded)."""

    def __init__(self):
        self.signal = None

    def __call__(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def install(self) -> dict:
        """Handle SIGINT and SIGTERM (only the main thread may install handlers; elsewhere signals keep theirs)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}


def check_run_dir(cfg: Config, resume: bool, overwrite: bool) -> bool:
    """Refuse a run-directory situation the flags do not allow, without touching anything; returns whether the
    directory exists with content. Called before any model loads so a clash costs no loading time."""
    run_dir = Path(cfg.run.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"run.output_dir {str(run_dir)!r} is a file; choose a directory path")
    exists = run_dir.is_dir() and any(run_dir.iterdir())
    if resume and overwrite:
        raise TrainingError("--resume and --overwrite contradict each other; pass --resume to continue the run in "
                            f"{str(run_dir)!r} or --overwrite to replace it")
    if resume and not exists:
        raise TrainingError(f"--resume: run directory {str(run_dir)!r} does not exist or is empty; "
                            "start without --resume")
    if exists and not overwrite and not resume:
        raise TrainingError(f"run directory {str(run_dir)!r} already exists; pass --resume to continue it, "
                            "--overwrite to replace it, or set run.output_dir")
    return exists


def prepare_run_dir(cfg: Config, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(cfg.run.output_dir)
    exists = check_run_dir(cfg, resume, overwrite)
    if resume:
        return run_dir
    try:
        if exists:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"cannot write to run directory {str(run_dir)!r} ({e.strerror}); choose a writable "
                            "run.output_dir") from None
    return run_dir


def identity(cfg: Config, adapter, world_size: int = 1) -> dict:
    """What a checkpoint must match to be resumed: the model and every setting that changes the trajectory."""
    from .config import diff_from_defaults

    # Only settings that differ from the defaults count, so a new config field (with a default that keeps the old
    # behaviour) does not orphan older runs. Logging, checkpoint cadence, output paths, evaluation, the step budget,
    # where the model lives and which device runs it do not change the trajectory; the model digest covers weights.
    ignored = ("run.", "eval.")
    # How the work is split across ranks does not either: the batch counts globally, so a run can resume on another
    # number of processes with the same global batch (per-rank noise keeps the trajectory; shared noise changes it).
    ignored_keys = {"train.steps", "model.path", "model.device", "train.distributed", "train.batch_size"}
    d = {k: v for k, v in diff_from_defaults(cfg).items() if not k.startswith(ignored) and k not in ignored_keys}
    d["global_batch"] = cfg.train.batch_size * world_size
    return {"model": ckpt.fingerprint(adapter.identity()), "config": ckpt.fingerprint(d)}


def train(cfg: Config, resume: bool = False, overwrite: bool = False, max_steps_this_session: int | None = None,
          log=print) -> RunResult:
    """Run (or resume) a training job described by ``cfg``; returns the run directory and the summary."""
    from ..logging_utils import MetricsLogger

    from ..prompts import load_prompts

    # Everything a user can get wrong is checked before the run directory is touched.
    check_run_dir(cfg, resume, overwrite)
    train_prompts = load_prompts(cfg.train.prompts)
    eval_prompts = load_prompts(cfg.eval.prompts)
    offline = None
    if cfg.srpo.offline_data:
        from ..data import load_offline

        offline = load_offline(cfg.srpo.offline_data, cfg.model.height, cfg.model.width)
    from . import distributed as dist_utils

    info = dist_utils.init_from_env(cfg.model.device)
    device = dist_utils.device_for(info, cfg.model.device) if info.enabled else resolve_device(cfg.model.device)
    torch.manual_seed(cfg.train.seed)
    adapter = load_adapter(cfg, device)
    for side in ("height", "width"):
        value, multiple = getattr(cfg.model, side), adapter.resolution_multiple
        if value % multiple:
            raise TrainingError(f"model.{side}={value} is not a multiple of {multiple} (VAE factor x 2x2 "
                                f"packing); use {max(1, value // multiple) * multiple}")
    reward = load_reward(cfg, device)
    if info.is_main:
        prepare_run_dir(cfg, resume, overwrite)
        if hasattr(reward, "describe"):  # a weighted sum states its normalisation once, in the log
            log(reward.describe())
    dist_utils.barrier(info)
    run_dir = Path(cfg.run.output_dir)
    if offline is not None and info.is_main:
        log(f"offline mode: {len(offline)} real images from {cfg.srpo.offline_data}")
    is_world = cfg.model.path == "tiny-world"
    method = make_method(cfg, adapter, reward)

    # Evaluate the base model before any adapter is attached (the adapter's cache serves both).
    summary: dict = {}
    samples_dir = run_dir / "samples"
    state_path = run_dir / "summary_before.json"
    if cfg.eval.before and info.is_main and not (resume and state_path.exists()):
        from ..evaluation import best_of_n, evaluate
        from ..report_images import save_grid

        t0 = time.time()
        before = evaluate(adapter, reward, cfg, eval_prompts, is_world)
        bo = best_of_n(adapter, reward, cfg, eval_prompts, cfg.eval.best_of) if cfg.eval.best_of > 1 else None
        save_grid(before.images, samples_dir / "before.png", ncol=len(cfg.eval.seeds) * 4)
        state_path.write_text(json.dumps({"reward_before": before.reward, f"reward_best_of_{cfg.eval.best_of}": bo,
                                          "judge_before": before.judge, "eval_seconds": time.time() - t0}, indent=1))
        log(f"base model: held-out reward {before.reward:.4f}" + (f", best-of-{cfg.eval.best_of} {bo:.4f}"
                                                                   if bo is not None else ""))
    dist_utils.barrier(info)
    if state_path.exists():
        summary.update(json.loads(state_path.read_text()))

    ids = identity(cfg, adapter, info.world_size)  # before sharding: the digest reads whole base weights
    params = apply_finetune_mode(cfg, adapter)
    t = cfg.train
    fsdp = dist_utils.uses_fsdp(t.finetune, t.distributed, info)
    plain_transformer_class = type(adapter.transformer)
    bf16_compute = precision.compute_dtype(t.mixed_precision)
    if fsdp:
        dist_utils.shard_full_model(adapter.transformer, info, bf16_compute)
        params = [p for p in adapter.transformer.parameters() if p.requires_grad]  # now DTensor shards
    elif bf16_compute is not None:
        precision.autocast_forward(adapter.transformer, bf16_compute)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.lr_schedule, t.warmup_steps, t.steps))
    named = [(n, p) for n, p in adapter.transformer.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    ema = {n: p.detach().clone() for n, p in named} if t.ema_decay > 0 else None
    ckpt_root = run_dir / "checkpoints"
    start_step = 0
    if resume:
        latest = ckpt.latest_checkpoint(ckpt_root)
        if latest is None:
            raise TrainingError(f"--resume: no complete checkpoint under {ckpt_root}; start without --resume "
                                "(with --overwrite)")
        loaded = ckpt.load_checkpoint(latest)
        st = loaded["state"]
        if st.get("model") != ids["model"]:
            raise TrainingError(f"--resume: checkpoint {latest.name} was trained from a different model; use the "
                                "model it was trained from or start a new run")
        if st.get("config") != ids["config"]:
            raise TrainingError(f"--resume: checkpoint {latest.name} was written with a different config; resume "
                                f"with the run's own config ({run_dir / 'config.yaml'}) or start a new run")
        # checkpoints hold whole tensors whatever wrote them, so any strategy and world size can read them
        load_trainable_state(cfg, adapter.transformer, loaded["trainable"], fsdp)
        if fsdp:
            dist_utils.load_full_optimizer_state(adapter.transformer, optimizer, loaded["optimizer"], names)
        else:
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["lr_scheduler"])
        ckpt.set_rng_state(loaded["rng"])
        if ema is not None and loaded["ema"] is not None:
            ema = {n: dist_utils.like_param(loaded["ema"][n], p) for n, p in named}
        start_step = st["step"]
        if info.is_main:
            log(f"resumed from {latest} at step {start_step}")
    if info.is_main:
        (run_dir / "config.yaml").write_text(cfg.to_yaml())

    rank, world = info.rank, info.world_size
    sampler = PromptSampler(train_prompts, t.batch_size, t.seed, t.shuffle_prompts, rank, world)
    offline_sampler = (PromptSampler(list(range(len(offline))), t.batch_size, t.seed, True, rank, world)
                       if offline else None)
    offline_until = cfg.srpo.offline_until_step
    metrics = MetricsLogger(run_dir, tensorboard=cfg.run.tensorboard, append=resume,
                            resume_step=start_step) if info.is_main else None
    stop = _StopFlag()
    previous = stop.install()
    nfe = method.nfe(t.batch_size)
    b, s_cfg, m_cfg = t.batch_size, cfg.srpo, cfg.model
    # Noise for the whole global batch comes from one generator every rank seeds alike: shared noise takes the
    # first slice on every rank (official), per-rank noise takes the rank's own slice (a 2-process run with batch b
    # then sees exactly the noise of a 1-process run with batch 2b).
    mine = slice(0, b) if s_cfg.share_noise_across_ranks else slice(rank * b, (rank + 1) * b)
    progress = None
    if cfg.run.progress and info.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=t.steps, initial=start_step, desc="srpo" if cfg.method == "srpo" else cfg.method,
                        unit="step", dynamic_ncols=True)

    last_saved = {"step": start_step if resume else None}  # the resumed checkpoint is not written again

    def save(step_done: int) -> Path | None:
        if last_saved["step"] == step_done:
            return None
        path = None
        if fsdp:  # gathering the shards is a collective: every rank takes part, rank 0 writes
            weights = dist_utils.full_model_state(adapter.transformer)
            opt_state = dist_utils.full_optimizer_state(adapter.transformer, optimizer, names)
            ema_state = {n: dist_utils.full_tensor(v) for n, v in ema.items()} if ema is not None else None
        else:
            weights, opt_state, ema_state = trainable_state(cfg, adapter.transformer), optimizer, ema
        if info.is_main:
            path = ckpt.save_checkpoint(
                ckpt_root, step_done, weights, opt_state, scheduler,
                dict(ids, data_position=list(sampler.position(step_done, 0)), version=__version__,
                     world_size=world, distributed="fsdp" if fsdp else "replicate" if info.enabled else "none"),
                ema=ema_state, keep=cfg.run.keep_checkpoints)
        dist_utils.barrier(info)
        last_saved["step"] = step_done
        return path

    step = start_step
    end = t.steps if max_steps_this_session is None else min(t.steps, start_step + max_steps_this_session)
    skipped = 0
    try:
        while step < end:
            t_step = time.time()
            window_rank = 0 if s_cfg.share_window_across_ranks else rank
            gen = torch.Generator().manual_seed(seed_for(t.seed, window_rank, step))
            gen_noise = torch.Generator().manual_seed(seed_for(t.seed, 0, step, stream=3))
            rng = random.Random(seed_for(t.seed, 0, step, stream=1))
            torch.manual_seed(seed_for(t.seed, rank, step, stream=2))  # dropout inside LoRA, if any
            optimizer.zero_grad(set_to_none=True)
            if offline is not None and (offline_until < 0 or step < offline_until):
                # Offline SRPO: the real image is x0 and the noise is fresh (maintainer's recipe, #10)
                idx = offline_sampler.batch(step)
                prompts = [offline.captions[i] for i in idx]
                x0 = adapter.encode_images(offline.images[idx])
                noise = torch.randn((b * world, *x0.shape[1:]), generator=gen_noise)[mine].to(x0)
                results = method.accumulate_gradients(step, prompts, gen, rng, noise=noise, x0=x0)
            else:
                prompts = sampler.batch(step)
                noise = adapter.noise(b * world, m_cfg.height, m_cfg.width, gen_noise)
                fresh = (torch.randn(noise.shape, generator=gen_noise)[mine]
                         if s_cfg.noise_prior == "fresh" else None)
                results = method.accumulate_gradients(step, prompts, gen, rng, noise=noise[mine],
                                                      fresh_noise=fresh)
            if not fsdp:  # FSDP2 reduce-scatters the gradients during backward
                dist_utils.all_reduce_gradients(params, info)
            grads = [p.grad for p in params if p.grad is not None]
            clip = t.grad_clip if t.grad_clip > 0 else float("inf")
            grad_norm = (float(dist_utils.full_tensor(torch.nn.utils.clip_grad_norm_(params, clip)))
                         if grads else 0.0)
            loss = dist_utils.all_reduce_mean(sum(r.loss for r in results), info, device)
            for r in results:
                r.reward = dist_utils.all_reduce_mean(r.reward, info, device)
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
                if ema is not None:
                    with torch.no_grad():
                        for n, p in named:
                            ema[n].lerp_(p.detach(), 1 - t.ema_decay)
            else:
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                if t.on_nonfinite == "abort":
                    raise TrainingError(f"non-finite loss or gradient at step {step}; lower train.learning_rate "
                                        "or set train.on_nonfinite=skip")
            scheduler.step()
            step += 1
            record = {
                "step": step, "loss": loss, "reward": sum(r.reward for r in results) / len(results),
                "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], "step_seconds": time.time() - t_step,
                "skipped": not finite, **nfe,
                **{f"{r.name}_reward": r.reward for r in results},
                **{f"{r.name}_sigma": r.sigma_query for r in results},
                # per-term means of a weighted-sum reward from its last scoring call, never hidden in the total
                **{f"reward_term_{k}": v for k, v in getattr(reward, "last_components", {}).items()},
            }
            if metrics is not None and (step % cfg.run.log_every == 0 or step == end or not finite):
                metrics.write(record)
            if not finite and info.is_main:
                log(f"step {step}: non-finite loss or gradient; step skipped")
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", reward=f"{record['reward']:.4f}",
                                     s_step=f"{record['step_seconds']:.2f}")
            if cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0 and step < end:
                save(step)
            if stop.signal is not None:
                save(step)  # no-op when this step was just checkpointed
                if info.is_main:
                    log(f"stopped by {signal.Signals(stop.signal).name} after step {step}; checkpoint written. "
                        "Continue with --resume")
                raise StoppedBySignal(stop.signal, step)
        save(step)
    finally:
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    if step < t.steps:  # a partial session: no final evaluation
        dist_utils.barrier(info)
        return RunResult(run_dir, {"step": step}, adapter)
    if ema is not None:  # evaluate and export the EMA weights
        with torch.no_grad():
            for n, p in named:
                p.copy_(ema[n])
    if fsdp:  # rank 0 evaluates and exports alone, so it gets an ordinary module with the gathered weights
        weights = dist_utils.full_model_state(adapter.transformer)
        if info.is_main:
            adapter.pipe.transformer = unsharded(plain_transformer_class, adapter.transformer, weights)
    else:  # the held-out evaluation after training computes as the one before it did, in the weights' dtype
        precision.restore_forward(adapter.transformer)
    if not info.is_main:
        dist_utils.barrier(info)
        return RunResult(run_dir, {"step": step}, adapter)
    adapter.transformer.eval()
    summary.update(finish(cfg, run_dir, adapter, reward, eval_prompts, is_world, skipped))
    dist_utils.barrier(info)
    return RunResult(run_dir, summary, adapter)


def finish(cfg: Config, run_dir: Path, adapter, reward, eval_prompts, is_world: bool, skipped: int) -> dict:
    """Evaluate after training, write sample grids, export weights, write summary.json (and the report)."""
    from ..evaluation import evaluate
    from ..export import export_weights
    from ..report_images import save_grid

    after = evaluate(adapter, reward, cfg, eval_prompts, is_world)
    save_grid(after.images, run_dir / "samples" / "after.png", ncol=len(cfg.eval.seeds) * 4)
    export_weights(cfg, adapter, run_dir / "export")
    before = json.loads((run_dir / "summary_before.json").read_text()) if (run_dir / "summary_before.json").exists() \
        else {}
    summary = dict(before)
    summary.update({
        "reward_after": after.reward,
        "judge_after": after.judge,
        "skipped_steps": skipped,
        "eval_prompts": len(eval_prompts),
        "eval_seeds": cfg.eval.seeds,
        "reward_definition": "training reward on held-out prompts (see directalign.evaluation)",
    })
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    if cfg.run.report:
        from ..report import write_report

        summary["report"] = str(write_report(run_dir))
    return summary
