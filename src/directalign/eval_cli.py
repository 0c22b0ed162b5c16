"""``directalign sample | eval | compare``: generate, score and compare models and runs.

Models (``--model``, or the positional arguments of ``compare``):

* ``tiny-world`` -- the shipped tiny world; ``base`` -- the base model of ``--config`` (the tiny world without one);
* a run directory (holds ``config.yaml``) -- the run's base model with its exported weights: the LoRA in
  ``export/lora`` (``pipe.load_lora_weights``), else the transformer in ``export/transformer``;
* an exported transformer directory (``config.json`` of a FLUX, SD3 or Qwen-Image transformer) or a LoRA directory
  (``pytorch_lora_weights.safetensors``), applied to ``--base`` (default: the tiny world); the transformer's class
  must be the base's;
* a diffusers pipeline directory (``model_index.json``); its family (FLUX, SD3, Qwen-Image) comes from the index.

Settings (prompts, seeds, steps, guidance, shift, resolution and the run's training reward) come from ``--config``,
else from the run's own ``config.yaml`` when the model is a run directory, else from the shipped ``tiny-srpo``
config (tiny-world models) or plain defaults (other models); flags such as ``--prompts`` or ``--seeds`` override
them. With a run's config, ``reward`` in ``aggregate.json`` is the run's training reward computed by
:func:`directalign.evaluation.evaluate`, the number ``summary.json`` reports: ``directalign eval --model RUN``
reproduces ``reward_after`` and ``directalign eval --model base --config RUN/config.yaml`` reproduces
``reward_before``.

Rewards (``--rewards``, comma-separated): ``train`` (the config's training reward model), ``tiny-world``,
``clip:PATH`` (cosine score of any transformers CLIP model), ``hpsv2:PATH`` (cosine, HPSv2.1 weights converted to a
transformers ``CLIPModel``), ``pickscore:PATH`` (``logit_scale.exp() * cos / 20`` as in the official SRPO code).
For each reward every image gets its absolute score with the prompt and the SGP-style relative score
``s("<pos>. <prompt>") - s("<neg>. <prompt>")`` (``--relative-words POS NEG``; default ``textured``/``flat`` for the
tiny world's reward, ``Realistic photo``/``CG Render`` otherwise, as in the SRPO paper's SGP-HPS).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from .errors import UserError


class EvalError(UserError, ValueError):
    """A user error in sample / eval / compare / report; the message says what to fix."""


GENERAL_RELATIVE_WORDS = ("Realistic photo", "CG Render")
TINY_RELATIVE_WORDS = ("textured", "flat")


# -------------------------------------------------------------------------------------------------- statistics
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (table to 30, Cornish-Fisher beyond)."""
    if df < 1:
        return float("nan")
    if df <= 30:
        return _T975[df - 1]
    z = 1.959963985
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values) -> dict:
    """Mean, sample std, n and the two-sided 95% t-interval of the mean (None where undefined)."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    n = len(v)
    if n == 0:
        return {"mean": None, "std": None, "n": 0, "ci95_low": None, "ci95_high": None}
    m = sum(v) / n
    if n == 1:
        return {"mean": m, "std": None, "n": 1, "ci95_low": None, "ci95_high": None}
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))
    h = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": m, "std": sd, "n": n, "ci95_low": m - h, "ci95_high": m + h}


def _clean(obj):
    """NaN and inf -> None, tensors -> lists, so the JSON is strict."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # tensors and arrays
        return _clean(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(_clean(obj), indent=1, allow_nan=False) + "\n", encoding="utf-8")


# -------------------------------------------------------------------------------------------------- models
@dataclass
class ModelRef:
    spec: str  # as the user gave it
    kind: str  # tiny-world | base | run | pipeline | transformer | lora
    label: str  # short name for tables
    base: str  # the base model path as in model.path ("tiny-world", a directory or a hub id)
    path: str = ""  # the resolved directory of the model itself ("" for the bare base models)
    run_dir: Path | None = None
    cfg: object = None  # the run's Config for run directories

    @property
    def is_world(self) -> bool:
        return self.base == "tiny-world"

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "label": self.label, "base": self.base, "path": self.path}


def _is_transformer_dir(p: Path) -> bool:
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "Transformer" in str(json.loads(cfg.read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return False


def resolve_model(spec: str, settings_cfg=None, base: str | None = None) -> ModelRef:
    """What ``spec`` names (nothing is loaded). ``base`` is the base for bare transformer / LoRA directories."""
    from .config import load_config

    if spec == "tiny-world":
        return ModelRef(spec, "tiny-world", "tiny-world", "tiny-world")
    if spec == "base":
        b = settings_cfg.model.path if settings_cfg is not None else "tiny-world"
        return ModelRef(spec, "base", "base", b)
    p = Path(spec).expanduser()
    if p.is_dir():
        label = p.resolve().name
        if (p / "config.yaml").is_file():
            cfg = load_config(p / "config.yaml")
            if not (p / "export" / "lora").is_dir() and not (p / "export" / "transformer").is_dir():
                raise EvalError(f"run {spec!r} has no export/lora or export/transformer; it has not finished "
                                "training (continue it with `directalign train --resume`)")
            return ModelRef(spec, "run", label, cfg.model.path, str(p.resolve()), p.resolve(), cfg)
        if (p / "model_index.json").is_file():
            return ModelRef(spec, "pipeline", label, str(p.resolve()), str(p.resolve()))
        b = base or (settings_cfg.model.path if settings_cfg is not None else "tiny-world")
        if _is_transformer_dir(p):
            return ModelRef(spec, "transformer", label, b, str(p.resolve()))
        if any(p.glob("*lora*.safetensors")):
            return ModelRef(spec, "lora", label, b, str(p.resolve()))
        raise EvalError(f"--model {spec!r} is not a run directory (config.yaml), a diffusers pipeline "
                        "(model_index.json), an exported transformer (config.json) or a LoRA directory")
    if p.exists():
        raise EvalError(f"--model {spec!r} is a file; give a run directory, a model directory, 'base' or "
                        "'tiny-world'")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise EvalError(f"--model {spec!r} does not exist; give a run directory, a model directory, 'base' or "
                        "'tiny-world'")
    return ModelRef(spec, "pipeline", spec.split("/")[-1], spec, spec)  # a hub id


def load_model(ref: ModelRef, cfg):
    """The adapter of the model's family for ``ref`` with the dtype and device of ``cfg.model``."""
    from .adapters.loading import family_of_dir, load_adapter
    from .engine.finetune import DTYPES, resolve_device

    c = copy.deepcopy(cfg)
    c.model.path = ref.base
    if ref.kind in ("pipeline", "transformer", "lora"):  # a local base directory says which family it is
        c.model.family = family_of_dir(Path(ref.base).expanduser()) or c.model.family
    device = resolve_device(c.model.device)
    adapter = load_adapter(c.model, device, DTYPES[c.model.dtype])
    if ref.kind == "run":
        lora, trans = ref.run_dir / "export" / "lora", ref.run_dir / "export" / "transformer"
        if lora.is_dir() and any(lora.glob("*.safetensors")):
            _apply_lora(adapter, lora, ref.cfg)
        else:
            _apply_transformer(adapter, trans)
    elif ref.kind == "transformer":
        _apply_transformer(adapter, Path(ref.path))
    elif ref.kind == "lora":
        _apply_lora(adapter, Path(ref.path), None)
    adapter.transformer.eval()
    return adapter


def _apply_lora(adapter, lora_dir: Path, run_cfg) -> None:
    try:
        adapter.pipe.load_lora_weights(str(lora_dir), adapter_name="directalign")
    except (OSError, ValueError, KeyError) as e:
        raise EvalError(f"could not load the LoRA in {str(lora_dir)!r}: {str(e).splitlines()[0]}") from None
    # Older exports hold no alpha, and diffusers then loads alpha = rank; restore the run's alpha / rank scale.
    if run_cfg is not None:
        want = run_cfg.train.lora_alpha / run_cfg.train.lora_rank
        have = next((m.scaling["directalign"] for m in adapter.transformer.modules()
                     if isinstance(getattr(m, "scaling", None), dict) and "directalign" in m.scaling), want)
        if abs(have - want) > 1e-9 * max(1.0, abs(want)):
            adapter.pipe.set_adapters(["directalign"], adapter_weights=[want / have])


def _apply_transformer(adapter, path: Path) -> None:
    cls = type(adapter.transformer)  # an exported transformer replaces the base's own, so it must be that class
    try:
        saved = json.loads((path / "config.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        saved = ""
    if saved and saved != cls.__name__:
        raise EvalError(f"the transformer in {str(path)!r} is a {saved}, but the base model's is a {cls.__name__}; "
                        "pass --base (or the run's config) with the model it was trained from")
    try:
        t = cls.from_pretrained(str(path), torch_dtype=adapter.dtype)
    except (OSError, ValueError, TypeError) as e:
        raise EvalError(f"could not load the transformer in {str(path)!r}: {str(e).splitlines()[0]}") from None
    adapter.pipe.transformer = t.to(adapter.device).requires_grad_(False)


# -------------------------------------------------------------------------------------------------- settings
def settings_config(config: str | None, refs: list[ModelRef], overrides: dict):
    """The Config every model of one command is generated and scored with, plus whether it defines a training
    reward (it does when it comes from a file, a run, or the shipped tiny-srpo config)."""
    from .config import Config, load_config, packaged_config, resolve_config_path

    if config is not None:
        cfg, trained = load_config(resolve_config_path(config)), True
    else:
        run = next((r for r in refs if r.cfg is not None), None)
        if run is not None:
            cfg, trained = copy.deepcopy(run.cfg), True
        elif all(r.is_world for r in refs):
            cfg, trained = load_config(packaged_config("tiny-srpo")), True
        else:
            cfg, trained = Config(), False
            cfg.eval.prompts, cfg.eval.seeds = "general:all", [0]
            cfg.model.height = cfg.model.width = 1024
    for key, value in overrides.items():
        if value is None:
            continue
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    from .config import validate

    validate(cfg)
    return cfg, trained


def _overrides(args) -> dict:
    return {
        "eval.prompts": getattr(args, "prompts", None), "eval.seeds": getattr(args, "seeds", None),
        "eval.steps": getattr(args, "steps", None), "eval.guidance": getattr(args, "guidance", None),
        "eval.batch_size": getattr(args, "batch_size", None), "srpo.shift": getattr(args, "shift", None),
        "model.height": getattr(args, "height", None), "model.width": getattr(args, "width", None),
        "model.device": getattr(args, "device", None),
    }


# -------------------------------------------------------------------------------------------------- rewards
@dataclass
class RewardSpec:
    name: str
    model: object
    positive: str
    negative: str


def _load_registered(kind: str, path: str, cfg, spec: str):
    """The reward of an ``--rewards KIND:PATH`` spec, built by the factory training uses
    (:func:`directalign.rewards.registry.make_reward`) with the run's reward settings: ``reward.dtype``, the
    backbones, ``reward.clamp_resized``, and ``reward.tokenizer`` only when KIND is the run's own kind (it names a
    tokenizer of that kind). Scores are raw (divisor 1, plain cosine for ``clip``) except PickScore, divided by 20
    as in the official SRPO code."""
    import dataclasses

    from .rewards.pickscore import SRPO_DIVISOR
    from .rewards.registry import make_reward, options_from_config

    r = cfg.reward
    own_kind = kind == r.kind or kind in r.terms.kinds
    options = dataclasses.replace(options_from_config(r), divisor=SRPO_DIVISOR if kind == "pickscore" else 1.0,
                                  use_logit_scale=False, tokenizer=r.tokenizer if own_kind else "")
    try:
        return make_reward(kind, path, options)
    except (OSError, ValueError, TypeError) as e:  # TypeError: a config.json value of the wrong type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EvalError(f"--rewards {spec!r}: could not load {path!r} as reward kind {kind}: {first}") from None


def _spec_name(kind: str, path: str) -> str:
    if kind == "clip":
        return f"clip-{Path(path).name or path}"
    return kind


def training_reward_model(cfg):
    """The reward model of ``cfg.reward`` (the one the run trained against), loaded as training loads it (the
    registry's :func:`~directalign.rewards.registry.load_reward`, checked against the method's held-out form), on
    ``cfg.model.device``."""
    from .engine.finetune import resolve_device
    from .methods.registry import METHODS
    from .rewards.registry import load_reward

    form = METHODS[cfg.method].held_out_form(cfg)[0]
    return load_reward(cfg.reward, resolve_device(cfg.model.device), form)


def load_rewards(specs: list[str], cfg, trained: bool, relative_words: list[str] | None,
                 train_model=None) -> list[RewardSpec]:
    """The rewards of ``--rewards`` specs: ``train`` (the run's own reward, as training loads it), ``tiny-world``,
    or ``KIND:PATH`` for any kind of the reward registry (:data:`directalign.rewards.registry.LOADERS`)."""
    from .engine.finetune import resolve_device
    from .rewards.registry import LOADERS

    device = resolve_device(cfg.model.device)
    path_kinds = [k for k in LOADERS if k != "tiny-world"]
    out: list[RewardSpec] = []
    for spec in specs:
        spec = spec.strip()
        kind, _, path = spec.partition(":")
        kind, path = kind.strip(), path.strip()
        if kind == "train":
            if not trained:
                raise EvalError("--rewards train needs a run or --config that defines the training reward")
            model = train_model if train_model is not None else training_reward_model(cfg)
            is_world, name = cfg.reward.kind == "tiny-world", _spec_name(cfg.reward.kind, cfg.reward.path)
        elif kind == "tiny-world" and not path:
            model, is_world, name = _load_registered(kind, kind, cfg, spec).to(device), True, kind
        elif kind in path_kinds and path:
            if not Path(path).expanduser().exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
                raise EvalError(f"--rewards {spec!r}: {path!r} does not exist; give the {kind} weights (a local "
                                "path or a hub id; directalign.rewards.zoo lists what each kind loads)")
            model = _load_registered(kind, str(Path(path).expanduser()), cfg, spec).to(device)
            is_world, name = False, _spec_name(kind, path)
        else:
            raise EvalError(f"--rewards: unknown reward {spec!r}; use train, tiny-world or KIND:PATH with KIND one "
                            f"of {', '.join(path_kinds)}")
        if relative_words:
            pos, neg = relative_words
        else:
            pos, neg = TINY_RELATIVE_WORDS if is_world else GENERAL_RELATIVE_WORDS
        base_name, i = name, 2
        while any(r.name == name for r in out):
            name, i = f"{base_name}-{i}", i + 1
        out.append(RewardSpec(name, model, pos, neg))
    return out


def score_images(spec: RewardSpec, images, prompts: list[str], chunk: int = 64) -> dict:
    """Per-image absolute and relative scores (N,) and the normalised image embeddings (N, D)."""
    import torch

    with torch.no_grad():
        return _score_images(spec, images, prompts, chunk)


def _score_images(spec: RewardSpec, images, prompts: list[str], chunk: int) -> dict:
    import torch

    from .rewards.relative import control_prompt

    scores, rel, emb = [], [], []
    r = spec.model
    dev = next(r.parameters()).device
    for i in range(0, len(prompts), chunk):
        im, pr = images[i : i + chunk].to(dev), prompts[i : i + chunk]
        state = r.encode_images(im)
        scores.append(r.score_texts(state, pr).float().cpu())
        pos = r.score_texts(state, [control_prompt(spec.positive, p) for p in pr]).float().cpu()
        neg = r.score_texts(state, [control_prompt(spec.negative, p) for p in pr]).float().cpu()
        rel.append(pos - neg)
        emb.append(state.float().cpu() if isinstance(state, torch.Tensor) else torch.zeros(len(pr), 0))
    return {"score": torch.cat(scores), "relative": torch.cat(rel), "embedding": torch.cat(emb)}


# -------------------------------------------------------------------------------------------------- images
def save_images(images, prompts: list[str], seeds: list[int], cfg, ref: ModelRef | None,
                out: Path) -> list[dict]:
    """PNG files and ``manifest.jsonl`` in ``out``: one line per image with everything needed to regenerate it."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    records = []
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    for i, (a, p, s) in enumerate(zip(arr, prompts, seeds)):
        name = f"{i:05d}.png"
        Image.fromarray(a).save(out / name)
        rec = {"file": name, "prompt": p, "seed": int(s), "steps": cfg.eval.steps, "guidance": cfg.eval.guidance,
               "shift": cfg.srpo.shift, "height": cfg.model.height, "width": cfg.model.width}
        if ref is not None:
            rec.update({"model": ref.path or ref.base, "model_kind": ref.kind, "base": ref.base})
        records.append(rec)
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return records


def load_image_folder(folder: Path) -> tuple[torch.Tensor, list[dict]]:
    """Images and manifest records of a folder written by ``directalign sample`` (or any folder with a
    ``manifest.jsonl`` whose lines hold ``file`` and ``prompt``)."""
    import numpy as np
    import torch
    from PIL import Image

    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise EvalError(f"--images {str(folder)!r} has no manifest.jsonl; write the folder with `directalign sample` "
                        "or add one line {\"file\": ..., \"prompt\": ..., \"seed\": ...} per image")
    records, tensors = [], []
    for i, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            file, prompt = rec["file"], rec["prompt"]
        except (ValueError, KeyError, TypeError):
            raise EvalError(f"{manifest}:{i} needs a JSON object with \"file\" and \"prompt\"") from None
        path = folder / file
        if not path.is_file():
            raise EvalError(f"{manifest}:{i}: image {file!r} is missing")
        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        tensors.append(torch.from_numpy(img).permute(2, 0, 1))
        records.append(rec)
    if not records:
        raise EvalError(f"{manifest} lists no images")
    if len({t.shape for t in tensors}) > 1:
        raise EvalError(f"images in {str(folder)!r} differ in size; score folders of one resolution")
    return torch.stack(tensors), records


def _prepare_out(out: Path, overwrite: bool, marker: str) -> Path:
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {str(out)!r} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise EvalError(f"--out {str(out)!r} already exists and is not empty; pass --overwrite or another --out")
        if not (out / marker).exists():
            raise EvalError(f"--out {str(out)!r} holds other files (no {marker}); refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# -------------------------------------------------------------------------------------------------- evaluation
@dataclass
class ModelEval:
    label: str
    aggregate: dict
    per_image: list[dict] = field(default_factory=list)
    images: object = None  # (N, 3, H, W) tensor


def _judge_applicable(prompts: list[str]) -> bool:
    from .world.dataset import parse_caption

    return all(parse_caption(p) for p in prompts)


def evaluate_model(ref: ModelRef | None, cfg, trained: bool, rewards: list[RewardSpec], *, images=None,
                   records=None, train_model=None, log=print) -> ModelEval:
    """Generate (or take ``images``), score with every reward, compute indicators and judge rates."""
    from . import metrics as M
    from .evaluation import evaluate, eval_slots
    from .methods.sampling import generate
    from .prompts import load_prompts

    train_rewards = None
    judge = None
    if trained and train_model is None:
        train_model = training_reward_model(cfg)
    if images is None:
        prompts = load_prompts(cfg.eval.prompts)
        adapter = load_model(ref, cfg)
        log(f"{ref.label}: generating {len(prompts) * len(cfg.eval.seeds)} images "
            f"({len(prompts)} prompts x {len(cfg.eval.seeds)} seeds, {cfg.eval.steps} steps)")
        if trained:
            result = evaluate(adapter, train_model, cfg, prompts, ref.is_world)
            images, slot_prompts, slot_seeds = result.images, result.prompts, result.seeds
            train_rewards, judge = result.rewards, result.judge
        else:
            slot_prompts, slot_seeds = eval_slots(prompts, cfg.eval.seeds)
            m = cfg.model
            images = generate(adapter, slot_prompts, slot_seeds, cfg.eval.steps, cfg.srpo.shift, cfg.eval.guidance,
                              m.height, m.width, cfg.eval.batch_size)
        del adapter
    else:
        slot_prompts = [r["prompt"] for r in records]
        slot_seeds = [r.get("seed") for r in records]
        if trained:
            from .evaluation import _score_in_chunks

            train_rewards = _score_in_chunks(train_model, images, slot_prompts, cfg)
    if judge is None and _judge_applicable(slot_prompts) and images.shape[-1] == 32 and images.shape[-2] == 32:
        from .world.judge import attribute_rates

        judge = attribute_rates(images, slot_prompts)

    n = len(slot_prompts)
    per_image: list[dict] = [{"index": i, "prompt": slot_prompts[i], "seed": slot_seeds[i]} for i in range(n)]
    columns: dict[str, list] = {}
    if train_rewards is not None:
        columns["train_reward"] = train_rewards.tolist()
    diversity: dict = {"pixel": M.diversity(images, slot_prompts)}
    for spec in rewards:
        s = score_images(spec, images, slot_prompts)
        columns[f"{spec.name}.score"] = s["score"].tolist()
        columns[f"{spec.name}.relative"] = s["relative"].tolist()
        if s["embedding"].shape[1]:
            diversity[f"{spec.name}.embedding"] = M.diversity(None, slot_prompts, embeddings=s["embedding"])
    for key, values in M.image_indicators(images).items():
        columns[key] = values.tolist()
    for key, values in columns.items():
        for i, v in enumerate(values):
            per_image[i][key] = v
    metrics_agg = {k: mean_ci(v) for k, v in columns.items()}
    aggregate = {
        "model": ref.describe() if ref is not None else None,
        "label": ref.label if ref is not None else None,
        "n_images": n,
        "settings": {"prompts": cfg.eval.prompts, "seeds": cfg.eval.seeds, "steps": cfg.eval.steps,
                     "guidance": cfg.eval.guidance, "shift": cfg.srpo.shift, "height": cfg.model.height,
                     "width": cfg.model.width},
        "reward": float(train_rewards.mean()) if train_rewards is not None else None,
        "reward_definition": ("the training reward of the config (same definition as summary.json's reward_before "
                              f"/ reward_after): form {cfg.reward.form}, positive {cfg.reward.positive_words}, "
                              f"negative {cfg.reward.negative_words}") if train_rewards is not None else None,
        "rewards": {r.name: {"relative_words": [r.positive, r.negative]} for r in rewards},
        "metrics": metrics_agg,
        "diversity": diversity,
        "judge": judge,
        "ci": "two-sided 95% Student-t interval of the mean over images (prompt x seed slots)",
    }
    return ModelEval(ref.label if ref is not None else "images", aggregate, per_image, images)


def indicator_means(aggregate: dict) -> dict:
    """``{indicator: mean}`` of an aggregate (the four image indicators and pixel diversity)."""
    from . import metrics as M

    out = {k: (aggregate["metrics"].get(k) or {}).get("mean") for k in M.INDICATORS}
    out["diversity_pixel"] = (aggregate.get("diversity") or {}).get("pixel")
    return out


def attach_baseline(aggregate: dict, baseline: dict) -> None:
    """Add ``baseline`` (means, deltas of every metric and indicator, drift warnings) to ``aggregate``."""
    from . import metrics as M

    base_means = {k: v.get("mean") for k, v in baseline["metrics"].items()}
    delta = {}
    for k, v in aggregate["metrics"].items():
        a, b = v.get("mean"), base_means.get(k)
        if a is not None and b is not None:
            delta[k] = a - b
    for k, v in (aggregate.get("diversity") or {}).items():
        b = (baseline.get("diversity") or {}).get(k)
        if v is not None and b is not None and math.isfinite(v) and math.isfinite(b):
            delta[f"diversity.{k}"] = v - b
    if aggregate.get("reward") is not None and baseline.get("reward") is not None:
        delta["reward"] = aggregate["reward"] - baseline["reward"]
    aggregate["baseline"] = {
        "label": baseline.get("label"),
        "reward": baseline.get("reward"),
        "metrics": base_means,
        "diversity": baseline.get("diversity"),
        "judge": baseline.get("judge"),
        "delta": delta,
        "warnings": M.drift_warnings(indicator_means(baseline), indicator_means(aggregate)),
    }


def write_eval(result: ModelEval, out: Path) -> None:
    write_json(out / "aggregate.json", result.aggregate)
    write_json(out / "per_image.json", result.per_image)
    keys: list[str] = []
    for rec in result.per_image:
        keys += [k for k in rec if k not in keys]
    with open(out / "per_image.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for rec in result.per_image:
            w.writerow({k: ("" if v is None else v) for k, v in _clean(rec).items()})


def _fmt(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def summary_lines(agg: dict) -> list[str]:
    lines = []
    if agg.get("reward") is not None:
        lines.append(f"reward (training definition): {agg['reward']:.6f}")
    for k, v in agg["metrics"].items():
        ci = f"  [{_fmt(v['ci95_low'])}, {_fmt(v['ci95_high'])}]" if v.get("ci95_low") is not None else ""
        lines.append(f"{k:32s} {_fmt(v['mean'])}{ci}")
    for k, v in (agg.get("diversity") or {}).items():
        lines.append(f"{'diversity.' + k:32s} {_fmt(v)}")
    for k, v in (agg.get("judge") or {}).items():
        lines.append(f"{'judge.' + k:32s} {_fmt(v, 3)}")
    b = agg.get("baseline")
    if b:
        lines.append(f"vs baseline {b.get('label')}:")
        for k, v in b["delta"].items():
            lines.append(f"  delta {k:26s} {v:+.4f}")
        for w in b["warnings"]:
            lines.append(f"  WARNING: {w}")
    return lines


# -------------------------------------------------------------------------------------------------- commands
def _reward_specs(args, trained: bool) -> list[str]:
    if args.rewards:
        return [s for item in args.rewards for s in item.split(",") if s.strip()]
    if trained:
        return ["train"]
    raise EvalError("no reward to score with: pass --rewards, e.g. --rewards clip:/path/to/clip")


def cmd_sample(args, log=print) -> int:
    from .methods.sampling import generate
    from .evaluation import eval_slots
    from .prompts import load_prompts
    from .report_images import save_grid

    ref = resolve_model(args.model, None, args.base)
    cfg, _ = settings_config(args.config, [ref], _overrides(args))
    if args.config is not None:
        ref = resolve_model(args.model, cfg, args.base)
    prompts = load_prompts(cfg.eval.prompts)
    out = _prepare_out(Path(args.out or f"samples/{ref.label}"), args.overwrite, "manifest.jsonl")
    adapter = load_model(ref, cfg)
    slot_prompts, slot_seeds = eval_slots(prompts, cfg.eval.seeds)
    m = cfg.model
    images = generate(adapter, slot_prompts, slot_seeds, cfg.eval.steps, cfg.srpo.shift, cfg.eval.guidance,
                      m.height, m.width, cfg.eval.batch_size)
    save_images(images, slot_prompts, slot_seeds, cfg, ref, out)
    save_grid(images, out / "grid.png", ncol=len(cfg.eval.seeds) * max(1, 8 // len(cfg.eval.seeds)))
    log(f"wrote {len(slot_prompts)} images and manifest.jsonl to {out}")
    return 0


def _baseline_aggregate(spec: str, cfg, trained, rewards, train_model, out: Path, log) -> dict:
    p = Path(spec)
    if (p / "aggregate.json").is_file():
        return json.loads((p / "aggregate.json").read_text())
    ref = resolve_model(spec, cfg)
    res = evaluate_model(ref, cfg, trained, rewards, train_model=train_model, log=log)
    bdir = out / "baseline"
    bdir.mkdir(parents=True, exist_ok=True)
    write_eval(res, bdir)
    return res.aggregate


def cmd_eval(args, log=print) -> int:
    if args.model is None and args.images is None:
        raise EvalError("give --model (to generate) or --images (a folder with manifest.jsonl to score)")
    if args.images is not None:
        folder = Path(args.images)
        images, records = load_image_folder(folder)
        ref = resolve_model(args.model, None, args.base) if args.model else None
        cfg, trained = settings_config(args.config, [ref] if ref else [], _overrides(args))
        world_images = all(r.get("base") == "tiny-world" for r in records)
        if args.config is None and (ref is None or ref.cfg is None) and not world_images:
            trained = False  # nothing defines a training reward for these images
        default_out = f"eval/{folder.resolve().name}"
    else:
        ref = resolve_model(args.model, None, args.base)
        cfg, trained = settings_config(args.config, [ref], _overrides(args))
        if args.config is not None:
            ref = resolve_model(args.model, cfg, args.base)
        images = records = None
        default_out = f"eval/{ref.label}"
    out = Path(args.out or default_out)
    if images is not None and Path(args.images).resolve().is_relative_to(out.resolve()):
        raise EvalError(f"--images {args.images!r} lies inside --out {str(out)!r}; write the scores elsewhere")
    _prepare_out(out, args.overwrite, "aggregate.json")
    specs = _reward_specs(args, trained)
    train_model = training_reward_model(cfg) if trained else None
    rewards = load_rewards(specs, cfg, trained, args.relative_words, train_model)
    result = evaluate_model(ref, cfg, trained, rewards, images=images, records=records, train_model=train_model,
                            log=log)
    if images is not None:
        result.aggregate["settings"] = {"images": str(Path(args.images).resolve())}
    if args.baseline:
        base = _baseline_aggregate(args.baseline, cfg, trained, rewards, train_model, out, log)
        attach_baseline(result.aggregate, base)
    if not args.no_images and images is None:
        save_images(result.images, [r["prompt"] for r in result.per_image], [r["seed"] for r in result.per_image],
                    cfg, ref, out / "images")
    write_eval(result, out)
    for line in summary_lines(result.aggregate):
        log(line)
    log(f"wrote {out / 'aggregate.json'}, per_image.json, per_image.csv")
    return 0


def compare_table(evals: list[tuple[str, dict]]) -> tuple[list[str], list[list]]:
    """Header and rows (one per model) of the comparison: reward, each metric's mean, diversity and judge rates."""
    cols: list[str] = ["model", "reward"]
    for _, agg in evals:
        cols += [k for k in agg["metrics"] if k not in cols]
    for _, agg in evals:
        cols += [f"diversity.{k}" for k in (agg.get("diversity") or {}) if f"diversity.{k}" not in cols]
    for _, agg in evals:
        cols += [f"judge.{k}" for k in (agg.get("judge") or {}) if f"judge.{k}" not in cols]
    rows = []
    for label, agg in evals:
        row = []
        for c in cols:
            if c == "model":
                row.append(label)
            elif c == "reward":
                row.append(agg.get("reward"))
            elif c.startswith("diversity."):
                row.append((agg.get("diversity") or {}).get(c[len("diversity."):]))
            elif c.startswith("judge."):
                row.append((agg.get("judge") or {}).get(c[len("judge."):]))
            else:
                row.append((agg["metrics"].get(c) or {}).get("mean"))
        rows.append(row)
    return cols, rows


def format_table(cols: list[str], rows: list[list]) -> str:
    """Models as columns, metrics as rows (fits a terminal however many metrics there are)."""
    labels = [str(r[0]) for r in rows]
    width = max(len(c) for c in cols)
    cell = max(10, *(len(lb) for lb in labels))
    lines = [f"{'':{width}s}  " + "  ".join(f"{lb:>{cell}s}" for lb in labels)]
    for j, c in enumerate(cols[1:], 1):
        lines.append(f"{c:{width}s}  " + "  ".join(f"{_fmt(r[j]):>{cell}s}" for r in rows))
    return "\n".join(lines)


def cmd_compare(args, log=print) -> int:
    if len(args.models) < 2:
        raise EvalError("compare needs at least two models, runs or eval directories")
    done: list[tuple[str, dict]] = []
    pending: list[ModelRef] = []
    order: list = []
    for spec in args.models:
        p = Path(spec)
        if (p / "aggregate.json").is_file():
            agg = json.loads((p / "aggregate.json").read_text())
            order.append((agg.get("label") or p.name, agg))
        else:
            ref = resolve_model(spec, None, args.base)
            pending.append(ref)
            order.append(ref)
    out = _prepare_out(Path(args.out or "compare"), args.overwrite, "compare.json")
    cfg = trained = rewards = train_model = None
    if pending:
        cfg, trained = settings_config(args.config, pending, _overrides(args))
        pending = [resolve_model(r.spec, cfg, args.base) for r in pending]
        train_model = training_reward_model(cfg) if trained else None
        rewards = load_rewards(_reward_specs(args, trained), cfg, trained, args.relative_words, train_model)
    it = iter(pending)
    labels_seen: dict[str, int] = {}
    for item in order:
        if isinstance(item, ModelRef):
            ref = next(it)
            agg = evaluate_model(ref, cfg, trained, rewards, train_model=train_model, log=log).aggregate
            label = ref.label
        else:
            label, agg = item
        labels_seen[label] = labels_seen.get(label, 0) + 1
        if labels_seen[label] > 1:
            label = f"{label}#{labels_seen[label]}"
        done.append((label, agg))
    cols, rows = compare_table(done)
    from .metrics import drift_warnings

    ref_means = indicator_means(done[0][1])
    warnings = {label: drift_warnings(ref_means, indicator_means(agg)) for label, agg in done[1:]}
    write_json(out / "compare.json", {"columns": cols, "rows": rows, "models": {lb: a for lb, a in done},
                                      "reference": done[0][0], "warnings": warnings})
    with open(out / "compare.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if v is None else v for v in _clean(r)])
    log(format_table(cols, rows))
    for label, ws in warnings.items():
        for wmsg in ws:
            log(f"WARNING ({label} vs {done[0][0]}): {wmsg}")
    log(f"wrote {out / 'compare.json'} and compare.csv")
    return 0


def cmd_report(args, log=print) -> int:
    from .report import write_report

    path = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    log(f"wrote {path}")
    return 0


# -------------------------------------------------------------------------------------------------- parser
def _add_settings(p, config_help: str) -> None:
    p.add_argument("--config", help=config_help)
    p.add_argument("--prompts", help="prompt source: tiny-world:heldout, general[:<category>], or a .txt/.jsonl/.csv")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds per prompt (e.g. --seeds 0 1 2 3)")
    p.add_argument("--steps", type=int, help="sampling steps")
    p.add_argument("--guidance", type=float, help="guidance scale")
    p.add_argument("--shift", type=float, help="scheduler shift")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", type=int, help="images per generation batch")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--base", help="base model for a bare transformer or LoRA directory (default: the config's "
                                  "model.path, else tiny-world)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory of this command")


def _add_rewards(p) -> None:
    p.add_argument("--rewards", action="append", metavar="LIST",
                   help="comma-separated rewards: train, tiny-world, clip:PATH, hpsv2:PATH, pickscore:PATH "
                        "(default: the config's training reward)")
    p.add_argument("--relative-words", nargs=2, metavar=("POS", "NEG"),
                   help="control phrases of the relative metric (default: textured flat for the tiny world, "
                        "'Realistic photo' 'CG Render' otherwise)")


def add_parsers(sub) -> None:
    cfg_help = ("YAML or shipped config name for the settings and training reward (default: the run's "
                "config.yaml, else tiny-srpo for the tiny world)")
    s = sub.add_parser("sample", help="generate images with a model or run, plus a manifest to regenerate them")
    s.add_argument("--model", required=True, help="base | tiny-world | run dir | exported or pipeline dir")
    _add_settings(s, cfg_help)
    e = sub.add_parser("eval", help="generate with fixed seeds (or take --images) and score with several rewards")
    e.add_argument("--model", help="base | tiny-world | run dir | exported or pipeline dir")
    e.add_argument("--images", help="score this folder (with manifest.jsonl) instead of generating")
    e.add_argument("--baseline", help="a model or an eval output directory to report differences against")
    e.add_argument("--no-images", action="store_true", help="do not save the generated images")
    _add_settings(e, cfg_help)
    _add_rewards(e)
    c = sub.add_parser("compare", help="side-by-side table of several models, runs or eval directories")
    c.add_argument("models", nargs="+", help="models, runs or eval output directories (the first is the reference)")
    _add_settings(c, cfg_help)
    _add_rewards(c)
    r = sub.add_parser("report", help="write a self-contained report.html for a run directory")
    r.add_argument("run_dir")
    r.add_argument("--out", help="output file (default: RUN_DIR/report.html)")
