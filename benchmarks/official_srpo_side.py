"""The official SRPO training step, run from a local clone of Tencent-Hunyuan/SRPO on the CPU.

It imports ``train_one_step`` / ``SRPO_train`` / ``run_sample_step`` and the ``CLIP`` reward of
``Tencent-Hunyuan/SRPO`` (``fastvideo/SRPO.py``) from the clone given by ``--official`` (extracted from the file's
syntax tree by name and executed unchanged; nothing of it is stored here), with its argument defaults from the same
file's parser and the flags of ``scripts/finetune/SRPO_training_hpsv2.sh`` (only the paths, ``--h``/``--w`` and
``--max_train_steps`` replaced). Its data path is its own ``LatentDataset`` / ``latent_collate_function`` /
``sp_parallel_dataloader_wrapper`` over embeddings precomputed, as its preprocessing script does, with the world's
``FluxPipeline.encode_prompt`` in the parent process. Stubbed, because the code cannot run as-is on a CPU:

* fp32: the code computes in bf16 under ``torch.autocast("cuda")``; on a CPU-only build that autocast is off, and
  the module's ``torch`` is a view of torch whose ``bfloat16`` is ``float32`` (its bf16 noise and ids would
  otherwise meet fp32 weights); the VAE loads in fp32 (the code loads it in bf16);
* FSDP over one process becomes the plain module with FSDP's ``clip_grad_norm_`` (torch's, over its parameters);
  its activation checkpointing becomes diffusers' ``enable_gradient_checkpointing`` (as directalign's);
  ``torch.distributed`` is real: gloo with one process and a file store;
* the reward: the code's ``CLIP`` class with its processor and model set to the world's CLIP reward and tokenizer,
  and ``torchvision``'s resize / crop / normalise (torchvision cannot load beside this torch) done by
  ``directalign.rewards.clip.clip_preprocess`` (bicubic antialiased, centre crop, CLIP mean/std) at the reward's
  input size; the DataLoader has no worker processes (the script's 4 workers would load in other processes).
* ``torch.autograd.set_detect_anomaly(True)`` (module level in the code) is not executed (it is not in the step).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import os
import random
import shlex
import sys
import tempfile
import types
from pathlib import Path

SIZE = 64
OFFICIAL_NAMES = ("get_random_cg_oily_adjective", "get_random_realism_adjective", "CLIP", "sd3_time_shift",
                  "flux_step", "prepare_latent_image_ids", "pack_latents", "unpack_latents", "run_sample_step",
                  "SRPO_train", "train_one_step")
SCRIPT = "scripts/finetune/SRPO_training_hpsv2.sh"


def official_namespace(source: str, torch) -> dict:
    """The official functions, by name, executed in a namespace with the module-level names they use."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from diffusers.image_processor import VaeImageProcessor
    from tqdm.auto import tqdm

    tree = ast.parse(source)
    nodes = [n for n in tree.body if getattr(n, "name", None) in OFFICIAL_NAMES]
    missing = set(OFFICIAL_NAMES) - {n.name for n in nodes}
    if missing:
        raise SystemExit(f"{sorted(missing)} not found in the official SRPO.py: another commit's layout")
    fp32_torch = types.ModuleType("torch")
    fp32_torch.__dict__.update({k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    fp32_torch.bfloat16 = torch.float32  # fp32 run: its bf16 literals (noise, ids, guidance) compute in fp32
    ns = {"torch": fp32_torch, "dist": dist, "F": F, "tqdm": tqdm, "VaeImageProcessor": VaeImageProcessor,
          "random": random, "os": os}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), "SRPO.py", "exec"), ns)  # noqa: S102 - the clone given
    return ns


def official_args(root: Path, source: str, data_json: Path, steps: int) -> argparse.Namespace:
    """The official parser (its ``__main__`` block up to ``parse_args``) on the HPS script's flags."""
    tree = ast.parse(source)
    main_block = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    body = []
    for stmt in main_block.body:
        if "parse_args" in ast.unparse(stmt):
            break
        body.append(stmt)
    ns = {"argparse": argparse}
    exec(compile(ast.Module(body=body, type_ignores=[]), "SRPO.py", "exec"), ns)  # noqa: S102
    script = (root / SCRIPT).read_text().replace("\\\n", " ")
    flags = shlex.split(script.split("fastvideo/SRPO.py", 1)[1].split("\n", 1)[0])
    replace = {"--h": str(SIZE), "--w": str(SIZE), "--data_json_path": str(data_json), "--max_train_steps": str(steps),
               "--pretrained_model_name_or_path": "world", "--vae_model_path": "world", "--output_dir": "out"}
    for i, f in enumerate(flags):
        if f in replace:
            flags[i + 1] = replace[f]
    return ns["parser"].parse_args(flags)


def load_file_module(name: str, path: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def official_side(root: Path, world: Path, steps: int, rec, checkpointing: bool) -> dict:
    """``steps`` calls of the official ``train_one_step`` as its ``main()`` makes them, recorded by ``rec``."""
    import torch
    import torch.distributed as dist
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.optimization import get_scheduler
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer, CLIPModel

    from directalign.rewards.clip import clip_preprocess

    source = (root / "fastvideo" / "SRPO.py").read_text()
    ns = official_namespace(source, torch)
    args = official_args(root, source, world / "embeddings" / "videos2caption.json", steps)
    sys.path.insert(0, str(root))  # fastvideo.utils.* (the package's __init__ files import torchvision: by path)
    load_file_module("fastvideo.utils.parallel_states", root / "fastvideo/utils/parallel_states.py")
    comm = load_file_module("fastvideo.utils.communications_flux", root / "fastvideo/utils/communications_flux.py")
    data = load_file_module("latent_flux_rl_datasets", root / "fastvideo/dataset/latent_flux_rl_datasets.py")
    dist.init_process_group("gloo", init_method=f"file://{world / 'gloo_store'}", rank=0, world_size=1)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    transformer = FluxTransformer2DModel.from_pretrained(world / "generator", subfolder="transformer",
                                                         torch_dtype=torch.float32)
    if args.gradient_checkpointing and checkpointing:
        transformer.enable_gradient_checkpointing()
    params = [p for p in transformer.parameters() if p.requires_grad]
    transformer.clip_grad_norm_ = lambda max_norm: torch.nn.utils.clip_grad_norm_(params, max_norm)  # FSDP's
    vae = AutoencoderKL.from_pretrained(world / "generator", subfolder="vae", torch_dtype=torch.float32)
    clip = CLIPModel.from_pretrained(world / "reward").eval().requires_grad_(False)
    reward = ns["CLIP"].__new__(ns["CLIP"])
    torch.nn.Module.__init__(reward)
    reward.device, reward.dtype, reward.model = device, torch.float32, _Transformers4Clip(clip)
    reward.processor = AutoTokenizer.from_pretrained(world / "reward")
    size = clip.config.vision_config.image_size
    reward.v_pre = lambda images: clip_preprocess(images, size, clamp=False)
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(0.9, 0.999),
                                  weight_decay=args.weight_decay, eps=1e-8)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=1000000, num_cycles=args.lr_num_cycles, power=args.lr_power,
                                 last_epoch=-1)
    dataset = data.LatentDataset(args.data_json_path, args.num_latent_t, 0)
    loader = DataLoader(dataset, shuffle=False, collate_fn=data.latent_collate_function,
                        batch_size=args.train_batch_size, num_workers=0, drop_last=True)
    batches = comm.sp_parallel_dataloader_wrapper(loader, device, args.train_batch_size, args.sp_size,
                                                  args.train_sp_batch_size)
    loader_it = _Next(rec.wrap(lambda: next(batches), "prompts", "other"))
    rec.hooks(transformer, torch)
    ns["SRPO_train"] = rec.wrap(ns["SRPO_train"], "other", "optimizer")
    fp = tempfile.mkdtemp()
    with rec.tracker or contextlib.nullcontext():
        rec.start()
        for step in range(1, steps + 1):  # main()'s loop: one train_one_step per step
            mid = torch.tensor([random.randint(5, args.timestep_length - 5)], device=device)
            ns["train_one_step"](args, device, transformer, vae, reward, optimizer, lr_scheduler,
                                 loader_it, None, args.max_grad_norm, mid, step, fp, False)
            rec.step_done()
    rec.close()
    dist.destroy_process_group()
    return rec.result()


class _Next:
    """``next(loader)`` on the wrapped data iterator."""

    def __init__(self, fn):
        self.fn = fn

    def __iter__(self):
        return self

    def __next__(self):
        return self.fn()


class _Transformers4Clip:
    """The CLIP model as the official code calls it (transformers 4: ``get_*_features`` return the projection;
    transformers 5 returns an output whose ``pooler_output`` holds it)."""

    def __init__(self, model):
        self.model, self.logit_scale = model, model.logit_scale

    def get_image_features(self, **kwargs):
        from directalign.rewards.clip import projected_features

        return projected_features(self.model.get_image_features(**kwargs))

    def get_text_features(self, **kwargs):
        from directalign.rewards.clip import projected_features

        return projected_features(self.model.get_text_features(**kwargs))


