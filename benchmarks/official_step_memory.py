"""The memory a training step adds, directalign's SRPO step beside the official SRPO code's, on one tiny FLUX world.

    python benchmarks/official_step_memory.py --official /tmp/srpo_official [--steps 5]
    python benchmarks/official_step_memory.py            # directalign's side only (no clone)

The official side (``official_srpo_side.py``: what it runs of the clone, and the stubs a CPU needs) runs
``train_one_step`` of ``Tencent-Hunyuan/SRPO`` (``fastvideo/SRPO.py``) imported from the clone given by
``--official``.

Both sides: FLUX geometry (8x VAE, 16 latent channels, ``step_profile.flux_shaped_world``), 64 px, 512 text tokens,
batch 1, 25 no-grad rollout steps, both Direct-Align branches, full fine-tuning, AdamW, clip 0.1, fp32, gradient
checkpointing on (the script's ``--gradient_checkpointing``). directalign's side runs the library's own
``StepLoop.run``. Each side runs in a fresh process, one after the other, twice: once for RSS alone (VmRSS after
each step, VmHWM over the steps) and once with ``step_profile.PhaseMemory`` tracking the live tensor bytes per phase
(prompts, rollout, branchN_forward (model, decode, reward), branchN_backward, optimizer; relative to the level before
each step). Writes ``benchmarks/results/official_step_memory.json`` and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_srpo_side
import step_profile as sp

SIZE, TOKENS, ROLLOUT = 64, 512, 25
OUT = Path(__file__).resolve().parent / "results" / "official_step_memory.json"


# ---------------------------------------------------------------------------------------------- measuring
class Recorder:
    """RSS per step (and, with ``live``, a :class:`step_profile.PhaseMemory` split into the common phases)."""

    def __init__(self, live: bool):
        self.tracker = sp.PhaseMemory() if live else None
        self.steps: list[dict] = []
        self.branch = 0

    def switch(self, name: str) -> None:
        if self.tracker is not None and self.tracker.phases and self.tracker.name not in ("", name):
            self.tracker.switch(name)

    def start(self) -> None:
        gc.collect()
        self.rss_before, self.anon_before = sp._proc_status_mb("VmRSS"), sp._proc_status_mb("RssAnon")
        sp._reset_peak_rss()
        self._begin()

    def _begin(self) -> None:
        self.branch = 0
        if self.tracker is not None:
            self.tracker.begin_step()

    def step_done(self) -> None:
        gc.collect()  # as begin_step: the level after this step is exactly the next one's base
        row = {"rss_after_mb": sp._proc_status_mb("VmRSS"), "rss_anon_after_mb": sp._proc_status_mb("RssAnon")}
        if self.tracker is not None:
            row["phases"] = self.tracker.end_step()
            row["live_after_bytes"] = self.tracker.current
        self.steps.append(row)
        self._begin()

    def hooks(self, transformer, torch) -> None:
        """Phase switches: a no-grad transformer call is the rollout, a grad one opens the next branch; every
        ``Tensor.backward`` is that branch's backward."""

        def pre(_module, _args, _kwargs=None):
            if not torch.is_grad_enabled():
                self.switch("rollout")
            elif not self.tracker or not self.tracker.name.endswith("_forward"):
                self.branch += 1
                self.switch(f"branch{self.branch}_forward")

        self._undo = [transformer.register_forward_pre_hook(pre).remove]
        backward = torch.Tensor.backward

        def tracked_backward(tensor, *args, **kwargs):
            self.switch(f"branch{self.branch}_backward")
            out = backward(tensor, *args, **kwargs)
            self.switch("other")
            return out

        torch.Tensor.backward = tracked_backward
        self._undo.append(lambda: setattr(torch.Tensor, "backward", backward))

    def close(self) -> None:
        for undo in getattr(self, "_undo", []):
            undo()

    def wrap(self, fn, phase: str, after: str):
        def wrapped(*args, **kwargs):
            self.switch(phase)
            out = fn(*args, **kwargs)
            self.switch(after)
            return out

        return wrapped

    def result(self) -> dict:
        rss = [self.rss_before] + [s["rss_after_mb"] for s in self.steps]
        out = {"rss_before_mb": self.rss_before, "rss_after_mb": rss[1:],
               "rss_increment_mb": [b - a for a, b in itertools.pairwise(rss)], "rss_peak_mb": sp._proc_status_mb("VmHWM"),
               "rss_added_mb": rss[-1] - rss[0]}
        out["rss_peak_added_mb"] = out["rss_peak_mb"] - self.rss_before
        # diagnostic after the last step: how much of the RSS is freed heap that glibc keeps (malloc_trim(0))
        gc.collect()
        out["trimmed"] = _trim()
        out["rss_after_trim_mb"] = sp._proc_status_mb("VmRSS")
        anon = [self.anon_before] + [s["rss_anon_after_mb"] for s in self.steps]  # heap and stacks, not code pages
        out.update(rss_anon_before_mb=self.anon_before, rss_anon_after_mb=anon[1:], rss_anon_added_mb=anon[-1] - anon[0])
        if self.tracker is not None:
            out["live_phases"] = [s["phases"] for s in self.steps]
            out["live_after_bytes"] = [s["live_after_bytes"] for s in self.steps]
        return out


def _trim() -> bool:
    import ctypes

    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


# ---------------------------------------------------------------------------------------------- directalign
def directalign_side(world: Path, steps: int, live: bool, checkpointing: bool, precompute: bool = True,
                     overrides: tuple[str, ...] = ()) -> dict:
    """directalign's SRPO steps through the library's ``StepLoop.run`` (``overrides``: extra config settings, for
    the tests' smaller work)."""
    from directalign.world_paths import WORLD_DIR_ENV

    previous = os.environ.get(WORLD_DIR_ENV)
    os.environ[WORLD_DIR_ENV] = str(world)  # model.path=tiny-world and the reward read the FLUX-shaped world
    try:
        return _directalign_steps(world, steps, live, checkpointing, precompute, overrides)
    finally:
        if previous is None:
            os.environ.pop(WORLD_DIR_ENV)
        else:
            os.environ[WORLD_DIR_ENV] = previous


def _directalign_steps(world, steps, live, checkpointing, precompute, overrides) -> dict:
    import torch

    from directalign.adapters.loading import load_adapter
    from directalign.config import build_config
    from directalign.engine.context import PromptSampler
    from directalign.engine.distributed import DistInfo
    from directalign.engine.finetune import DTYPES, FineTuning
    from directalign.engine.loop import StepLoop
    from directalign.methods.registry import METHODS
    from directalign.prompts import load_prompts
    from directalign.rewards.registry import load_reward

    torch.manual_seed(0)
    cfg = build_config({}, sp.MEMORY_SETTINGS + [
        "train.finetune=full", f"train.gradient_checkpointing={str(checkpointing).lower()}",
        f"train.prompts={world / 'prompts.txt'}", "train.shuffle_prompts=false", f"train.steps={steps}",
        "run.progress=false", "run.report=false", f"run.output_dir={world / 'run'}", *overrides])
    device = torch.device("cpu")
    adapter = load_adapter(cfg.model, device, DTYPES[cfg.model.dtype])
    spec = METHODS[cfg.method]
    reward = load_reward(cfg.reward, device, spec.held_out_form(cfg)[0])
    method = spec.build(cfg, adapter, reward)
    ft = FineTuning.setup(cfg.train, adapter, DistInfo())
    sampler = PromptSampler(load_prompts(cfg.train.prompts), 1, cfg.train.seed, False)
    rec = Recorder(live)
    rec.hooks(adapter.transformer, torch)
    adapter.encode_prompts = rec.wrap(adapter.encode_prompts, "prompts", "other")
    method.train_step = rec.wrap(method.train_step, "other", "optimizer")
    loop = StepLoop(train_cfg=cfg.train, run_cfg=cfg.run, method=method, ft=ft, sampler=sampler, device=device,
                    run_dir=world / "run", checkpoint_state=lambda step: {}, extra_metrics=dict, log=print,
                    after_step=lambda step: rec.step_done(),
                    **({"precompute_prompts": True} if precompute else {}))  # (older StepLoops lack the option)
    loop.save = lambda step: None  # no checkpoint writes in a memory measurement
    try:
        with rec.tracker or contextlib.nullcontext():
            rec.start()
            loop.run(0, steps, False, None)
    finally:
        rec.close()
    return rec.result()


# ---------------------------------------------------------------------------------------------- processes
def prepare_world(root: Path, prompts: list[str]) -> Path:
    """The FLUX-shaped world, the prompt list, and the official preprocessing's output (its json + .pt files)."""
    import torch
    from diffusers import FluxPipeline

    sp.flux_shaped_world(root, SIZE)
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = root / "embeddings"
    for sub in ("prompt_embed", "pooled_prompt_embeds", "text_ids"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    pipe = FluxPipeline.from_pretrained(root / "generator")
    items = []
    with torch.no_grad():  # as the official data_preprocess/preprocess_flux_embedding.py: one file per tensor
        for i, prompt in enumerate(prompts):
            embeds, pooled, text_ids = pipe.encode_prompt([prompt], prompt_2=None, max_sequence_length=TOKENS)
            name = f"{i}.pt"
            torch.save(embeds[0], out / "prompt_embed" / name)
            torch.save(pooled[0], out / "pooled_prompt_embeds" / name)
            torch.save(text_ids[0], out / "text_ids" / name)
            items.append({"prompt_embed_path": name, "pooled_prompt_embeds_path": name, "text_ids": name,
                          "caption": prompt})
    (out / "videos2caption.json").write_text(json.dumps(items))
    return root


def run_child(side: str, world: Path, official: Path | None, steps: int, live: bool, checkpointing: bool,
              extra: tuple[str, ...] = ()) -> dict:
    """One side in a fresh process (the numbers of a process that has run nothing else)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, __file__, "--child", side, "--world", str(world), "--steps", str(steps),
           "--child-out", str(out)] + (["--official", str(official)] if official else []) + \
        (["--live"] if live else []) + ([] if checkpointing else ["--no-checkpointing"]) + list(extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{side} ({'live' if live else 'rss'}) failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def machine() -> dict:
    import torch

    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines() if line.startswith("Model name")), "")
    except OSError:
        pass
    return {"cpu_model": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine()}


PHASES = ["prompts", "rollout", "branch1_forward", "branch1_backward", "branch2_forward", "branch2_backward",
          "optimizer", "other", "total"]


def table(results: dict) -> str:
    """Markdown: RSS per step and the live tensor MiB per phase (peak/end above the pre-step level, last step)."""
    head = ("| side | RSS before MB | RSS after each step MB | increment per step MB | added by the steps MB | "
            "peak RSS above before MB | anonymous RSS added MB | added MB, every run | after malloc_trim MB |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for side, r in results.items():
        rss = r["rss"]
        lines.append(f"| {side} | {rss['rss_before_mb']:.1f} | {' '.join(f'{v:.1f}' for v in rss['rss_after_mb'])} "
                     f"| {' '.join(f'{v:+.1f}' for v in rss['rss_increment_mb'])} | {rss['rss_added_mb']:.1f} | "
                     f"{rss['rss_peak_added_mb']:.1f} | {rss['rss_anon_added_mb']:.1f} | "
                     f"{' '.join(f'{v:.1f}' for v in r.get('rss_added_mb_runs', []))} | "
                     f"{rss['rss_after_trim_mb'] - rss['rss_before_mb']:.1f} |")
    lines += ["", "Live tensor MiB above the level before the step, peak/end, step 1 | last step:", "",
              "| phase | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    mib = 2 ** 20

    def cell(ph: dict, k: str) -> str:
        if k not in ph:
            return "-"
        return f"{ph[k]['peak'] / mib:.2f}/{ph[k]['end'] / mib:.2f}" if "end" in ph[k] else f"{ph[k]['peak'] / mib:.2f}"

    for k in PHASES:
        cells = []
        for r in results.values():
            phases = r.get("live", {}).get("live_phases")
            cells.append(f"{cell(phases[0], k)} \\| {cell(phases[-1], k)}" if phases else "-")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", type=Path, default=None, help="a local clone of Tencent-Hunyuan/SRPO")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3, help="RSS runs per side (the median run is reported)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--no-checkpointing", action="store_true", help="both sides without gradient checkpointing")
    p.add_argument("--no-precompute-prompts", action="store_true",
                   help="directalign encodes each step's prompts inside the step (train.precompute_prompts=false, the "
                        "default of training runs; the default here is true, as the official code's preprocessed "
                        "embeddings)")
    p.add_argument("--child", choices=("directalign", "official"), help=argparse.SUPPRESS)
    p.add_argument("--world", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--live", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import torch

    from directalign.compat import quiet_loading

    quiet_loading()
    torch.set_num_threads(2)
    checkpointing = not args.no_checkpointing
    if args.child:
        run = (lambda *a: directalign_side(*a, precompute=not args.no_precompute_prompts)) \
            if args.child == "directalign" else (lambda world, steps, live, ckpt: official_srpo_side.official_side(
                args.official, world, steps, Recorder(live), ckpt))
        args.child_out.write_text(json.dumps(run(args.world, args.steps, args.live, checkpointing)))
        return
    from directalign.prompts import load_prompts

    prompts = load_prompts("tiny-world:train")[:args.steps]
    sides = ["directalign"] + (["official"] if args.official else [])
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        world = prepare_world(Path(tmp), prompts)
        for side in sides:
            extra = ("--no-precompute-prompts",) if args.no_precompute_prompts else ()
            runs = [run_child(side, world, args.official, args.steps, False, checkpointing, extra)
                    for _ in range(args.repeats)]
            median = sorted(runs, key=lambda r: r["rss_added_mb"])[len(runs) // 2]
            results[side] = {"rss": median, "rss_added_mb_runs": [r["rss_added_mb"] for r in runs], "rss_runs": runs,
                             "live": run_child(side, world, args.official, args.steps, True, checkpointing, extra)}
    commit = ""
    if args.official:
        marker = args.official / ".official_commit"
        commit = marker.read_text().strip() if marker.exists() else subprocess.run(
            ["git", "-C", str(args.official), "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    settings = {"resolution": SIZE, "text_tokens": TOKENS, "rollout_steps": ROLLOUT, "batch": 1, "dtype": "float32",
                "finetune": "full", "gradient_checkpointing": checkpointing, "steps": args.steps, "prompts": prompts,
                "directalign_precompute_prompts": not args.no_precompute_prompts, "repeats": args.repeats}
    doc = {"settings": settings, "official_commit": commit, "machine": machine(), "results": results}
    if "official" in results:
        doc["ratio_added"] = results["directalign"]["rss"]["rss_added_mb"] / max(
            results["official"]["rss"]["rss_added_mb"], 1e-9)
    text = table(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    command = "python benchmarks/official_step_memory.py" + (f" --official {args.official}" if args.official else "") \
        + f" --steps {args.steps} --repeats {args.repeats}" + ("" if checkpointing else " --no-checkpointing") \
        + (" --no-precompute-prompts" if args.no_precompute_prompts else "")
    args.out.with_suffix(".md").write_text(
        f"# Step memory beside the official SRPO code\n\n`{command}`\n\nofficial commit `{commit or '-'}`, "
        f"torch {doc['machine']['torch']}, {doc['machine']['cpu_model']}, {doc['machine']['cores']} cores, "
        f"{doc['machine']['torch_threads']} threads. Settings: {json.dumps(dict(settings, prompts=len(prompts)))}"
        f"\n\n{text}\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
