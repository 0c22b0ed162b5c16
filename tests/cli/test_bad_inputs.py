"""Bad inputs through ``directalign.cli.main``: each one exits with status 2 and exactly one stderr line
``directalign: error: ...`` that names the problem and the fix, prints no traceback, and changes no existing file.

One workspace serves every case: an existing run (with a checkpoint at step 1), input files of every kind, model
directories of the wrong kind. Its files (and the model world's) are fingerprinted before and after each case. The one
exception is a run directory's lock file (engine.rundir.LOCK_FILE): a --resume attempt locks the run before it reads
the checkpoint, which may create the file or rewrite it; afterwards it must be released (empty: no PID left behind).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from directalign.cli import main
from directalign.engine.rundir import LOCK_FILE

FAST = ["train.steps=2", "train.batch_size=1", "srpo.rollout_steps=2", "srpo.grid_points=40",
        "srpo.window_margin=2", "eval.before=false", "run.progress=false", "train.lora_rank=4", "eval.seeds=[0]",
        "eval.steps=2", "eval.best_of=1", "run.report=false"]


def _sets(items) -> list[str]:
    out = []
    for s in items:
        out += ["--set", s]
    return out


def _png(path: Path, color=(200, 30, 30)) -> None:
    from PIL import Image

    Image.new("RGB", (32, 32), color).save(path)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _offline(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        _png(folder / f"img{i}.png", (40 * i, 100, 200))
        (folder / f"img{i}.txt").write_text(f"a red circle number {i}\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def ws(random_world_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    world = random_world_dir
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIRECTALIGN_WORLD_DIR", str(world))
        code = main(["train", *_sets(FAST + [f"run.output_dir={root / 'run'}"]), "--max-steps-this-session", "1"])
        assert code == 0
    assert (root / "run" / "checkpoints" / "step-00000001" / "state.json").is_file()
    with pytest.MonkeyPatch.context() as mp:  # checkpoints at steps 1 and 2 of a cosine schedule (issue 16 item 4)
        mp.setenv("DIRECTALIGN_WORLD_DIR", str(world))
        code = main(["train", *_sets(FAST + [f"run.output_dir={root / 'run-cosine'}", "train.lr_schedule=cosine",
                                             "train.steps=3", "run.checkpoint_every=1"]),
                     "--max-steps-this-session", "2"])
        assert code == 0
    assert (root / "run-cosine" / "checkpoints" / "step-00000002" / "state.json").is_file()
    shutil.copytree(root / "run", root / "run-corrupt")
    t = root / "run-corrupt" / "checkpoints" / "step-00000001" / "trainable.safetensors"
    t.write_bytes(t.read_bytes()[:100])
    (root / "run-nockpt").mkdir()
    (root / "run-nockpt" / "metrics.jsonl").write_text("")

    # configs
    c = root / "configs"
    c.mkdir()
    (c / "unknown.yaml").write_text("srpo:\n  windw: [5, 25]\n", encoding="utf-8")
    (c / "invalid.yaml").write_text("train:\n  steps: [1,\n", encoding="utf-8")
    (c / "latin1.yaml").write_bytes("train:\n  prompts: caf\xe9\n".encode("latin-1"))
    (c / "list.yaml").write_text("- train\n- srpo\n", encoding="utf-8")
    (c / "renamed.yaml").write_text("srpo:\n  shift: 1.0\n", encoding="utf-8")
    (c / "other-method.yaml").write_text("method: srpo\ngrpo:\n  sde: flow\n", encoding="utf-8")

    # prompts
    p = root / "prompts"
    p.mkdir()
    (p / "empty.txt").write_text("\n  \n\n", encoding="utf-8")
    (p / "latin1.txt").write_bytes("a caf\xe9 on a table\n".encode("latin-1"))
    with open(p / "huge.txt", "wb") as fh:  # sparse: 51 MB on paper, nothing on disk
        fh.truncate(51 * 1024 * 1024)
    (p / "longline.txt").write_text("a red circle\n" + "very " * 500 + "long\n", encoding="utf-8")
    (p / "bad.jsonl").write_text('{"prompt": "a red circle"}\n{"prompt": oops}\n', encoding="utf-8")
    (p / "nocol.csv").write_text("caption\na red circle\n", encoding="utf-8")
    (p / "hugefield.csv").write_text('prompt\n"' + "x" * 200_000 + '"\n', encoding="utf-8")
    (p / "adir.txt").mkdir()

    # offline data
    o = root / "offline"
    corrupt = _offline(o / "corrupt")
    (corrupt / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png at all")
    truncated = _offline(o / "truncated")
    (truncated / "img0.png").write_bytes((truncated / "img0.png").read_bytes()[:60])
    nocap = _offline(o / "nocaption")
    (nocap / "img1.txt").unlink()
    orphan = _offline(o / "orphan")
    (orphan / "stray.txt").write_text("a caption whose image was renamed\n", encoding="utf-8")
    shared = _offline(o / "shared")
    _png(shared / "img0.jpg")
    emptycap = _offline(o / "emptycap")
    (emptycap / "img0.txt").write_text("  \n", encoding="utf-8")
    bomb = _offline(o / "bomb")
    (bomb / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2,
                                                                                        0, 0, 0))
                                    + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b""))
    man = o / "manifest"
    man.mkdir()
    (man / "manifest.jsonl").write_text('{"image": "missing.png", "caption": "a red circle"}\n', encoding="utf-8")
    (o / "notes.md").write_text("not data\n", encoding="utf-8")

    # models
    m = root / "models"
    (m / "empty-model").mkdir(parents=True)
    clip_text = m / "clip-text"
    shutil.copytree(world / "generator" / "text_encoder", clip_text)
    for f in (world / "generator" / "tokenizer").iterdir():
        shutil.copy(f, clip_text / f.name)
    trunc = m / "reward-truncated"
    shutil.copytree(world / "reward", trunc)
    (trunc / "model.safetensors").write_bytes((trunc / "model.safetensors").read_bytes()[:1000])
    other = m / "other-world"
    shutil.copytree(world / "generator", other / "generator")
    wfile = other / "generator" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(wfile))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(wfile))
    (m / "empty-world").mkdir()
    badtype = m / "bad-config-type"
    shutil.copytree(world / "generator", badtype)
    tcfg = badtype / "transformer" / "config.json"
    tcfg.write_text(tcfg.read_text().replace('"num_layers": ', '"num_layers": "two", "_was": '))
    # issue 16 item 8: reward weights files holding code (unpickling would create pwned.txt); a SigLIP stand-in
    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(root / 'pwned.txt')!r}, 'w').write('pwned')",)

    for name in ("pickled.pt", "pickled.pth"):
        torch.save({"layers.0.weight": torch.zeros(2), "extra": Payload()}, m / name)
    (m / "siglip").mkdir()
    (m / "siglip" / "config.json").write_text('{"model_type": "siglip_vision_model"}', encoding="utf-8")

    # run directories that cannot be written
    (root / "afile").write_text("a file, not a directory\n")
    locked = root / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    yield root
    locked.chmod(0o700)


def _fingerprint(*roots: Path) -> dict:
    """Every path under ``roots`` with its type, size, mtime and (for files under 1 MB) content hash."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.name == LOCK_FILE:
                continue  # checked by _held_locks
            st = p.lstat()
            if p.is_dir():
                out[str(p)] = ("dir", st.st_mode)
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < 1 << 20 else None
                out[str(p)] = ("file", st.st_size, st.st_mtime_ns, st.st_mode, digest)
    return out


def _held_locks(root: Path) -> list[str]:
    """The lock files under ``root`` that still hold a PID (a run that did not release its lock)."""
    return [str(p) for p in root.rglob(LOCK_FILE) if p.stat().st_size]


@dataclass
class Case:
    id: str
    args: list[str]
    needles: list[str]  # the problem and the fix, each must appear in the error line
    env: dict = field(default_factory=dict)
    writable_check: bool = False  # root writes a 0o500 directory: use a place no one may write (/sys) instead
    command: str = "train"  # other commands get only ``args`` (no training settings)


CASES = [
    # ---------------------------------------------------------------------------------------------- config
    Case("unknown-top-level-key", ["--set", "trian.steps=3"], ["'trian'", "allowed keys here"]),
    Case("unknown-nested-key", ["--set", "train.stepz=3"], ["train.stepz", "allowed keys here: steps"]),
    Case("unknown-key-in-yaml", ["--config", "{ws}/configs/unknown.yaml"], ["srpo.windw", "allowed keys here"]),
    Case("wrong-type-int", ["--set", "train.steps=abc"], ["train.steps", "expected an integer"]),
    Case("wrong-type-float-for-int", ["--set", "train.batch_size=1.5"], ["train.batch_size", "expected an integer"]),
    Case("wrong-type-bool", ["--set", "run.progress=maybe"], ["run.progress", "expected true or false"]),
    Case("wrong-type-list", ["--set", "srpo.window=5"], ["srpo.window", "expected a list"]),
    Case("wrong-type-number", ["--set", "train.learning_rate=fast"], ["train.learning_rate", "expected a number"]),
    Case("non-finite-number", ["--set", "sampling.shift=.inf"], ["sampling.shift", "expected a finite number"]),
    Case("shift-not-positive", ["--set", "sampling.shift=0"], ["sampling.shift", "must be > 0"]),
    Case("window-outside-schedule", ["--set", "srpo.window=[5, 60]"], ["srpo.window", "t1 <= srpo.schedule_steps"]),
    Case("window-t0-ge-t1", ["--set", "srpo.window=[30, 10]"], ["srpo.window", "need 0 <= t0 < t1"]),
    Case("window-at-pure-noise", ["--set", "srpo.window=[0, 10]"], ["srpo.window", "use t0 >= 1"]),
    Case("negative-learning-rate", ["--set", "train.learning_rate=-1e-4"], ["train.learning_rate", "must be > 0"]),
    Case("zero-steps", ["--set", "train.steps=0"], ["train.steps", "must be >= 1"]),
    Case("ratio-out-of-range", ["--set", "srpo.groundtruth_ratio=1.5"], ["srpo.groundtruth_ratio", "in [0, 1)"]),
    Case("negative-seed", ["--set", "train.seed=-1"], ["train.seed", "must be in [0, 2^63)"]),
    Case("bad-choice", ["--set", "train.finetune=qlora"], ["train.finetune", "choose one of lora, full"]),
    Case("bad-choice-in-method-section", ["--set", "srpo.loss=squared"], ["srpo.loss", "choose one of hinge, linear"]),
    Case("bad-method", ["--set", "method=ppo"], ["method: 'ppo' is not allowed", "choose one of srpo, direct-align"]),
    Case("unknown-key-with-line-break", ["--set", "train.ste\nps=3"], ["unknown config key 'train.ste\\nps'"]),
    # ---------------------------------------------------------------------------------------------- one section
    Case("renamed-key-via-set", ["--set", "srpo.shift=2"], ["'srpo.shift' was renamed", "use sampling.shift instead"]),
    Case("renamed-key-in-yaml", ["--config", "{ws}/configs/renamed.yaml"],
         ["'srpo.shift' was renamed", "use sampling.shift instead"]),
    Case("other-method-section-via-set", ["--set", "grpo.sde=flow"],
         ["section 'grpo' belongs to method grpo", "but method is srpo", "set method: grpo"]),
    Case("other-method-section-in-yaml", ["--config", "{ws}/configs/other-method.yaml"],
         ["section 'grpo' belongs to method grpo", "remove the section or set method: grpo"]),
    Case("method-changed-section-kept", ["--set", "method=grpo"],
         ["section 'srpo' belongs to method srpo / direct-align", "but method is grpo"]),
    Case("malformed-set", ["--set", "train.steps"], ["--set", "expected key=value"]),
    Case("config-missing", ["--config", "{ws}/configs/nope.yaml"], ["nope.yaml", "pass an existing YAML file"]),
    Case("config-invalid-yaml", ["--config", "{ws}/configs/invalid.yaml"], ["not valid YAML", "fix its syntax"]),
    Case("config-not-utf8", ["--config", "{ws}/configs/latin1.yaml"], ["not UTF-8", "save it as UTF-8"]),
    Case("config-not-a-mapping", ["--config", "{ws}/configs/list.yaml"], ["list.yaml", "must hold a mapping"]),
    # ---------------------------------------------------------------------------------------------- model
    Case("resolution-not-multiple", ["--set", "model.height=34"], ["model.height=34", "use 32"]),
    Case("model-dir-missing", ["--set", "model.path={ws}/models/no-such-model"], ["no-such-model", "model.path"]),
    Case("model-dir-empty", ["--set", "model.path={ws}/models/empty-model"], ["empty-model", "model_index.json"]),
    Case("model-dir-is-a-reward", ["--set", "model.path={world}/reward"], ["reward", "model_index.json"]),
    Case("model-config-wrong-type", ["--set", "model.path={ws}/models/bad-config-type"],
         ["bad-config-type", "model.path"]),
    Case("model-not-cached-offline", ["--set", "model.path=nobody/no-such-model"],
         ["nobody/no-such-model", "model.path"]),
    Case("world-weights-missing", [], ["weights are missing", "rebuild them"],
         env={"DIRECTALIGN_WORLD_DIR": "{ws}/models/empty-world"}),
    Case("device-without-cuda", ["--set", "model.device=cuda"], ["model.device", "use model.device=cpu"]),
    # ---------------------------------------------------------------------------------------------- reward
    Case("reward-is-the-generator", ["--set", "reward.kind=clip", "--set", "reward.path={world}/generator"],
         ["generator", "reward.path"]),
    Case("reward-wrong-architecture", ["--set", "reward.kind=clip", "--set", "reward.path={ws}/models/clip-text"],
         ["clip-text", "CLIP"]),
    Case("reward-missing", ["--set", "reward.kind=clip", "--set", "reward.path={ws}/models/no-reward"],
         ["no-reward", "reward.path"]),
    Case("reward-truncated-weights", ["--set", "reward.kind=clip",
                                      "--set", "reward.path={ws}/models/reward-truncated"],
         ["reward-truncated", "reward.path"]),
    # ---------------------------------------------------------------------------------------------- prompts
    Case("prompts-empty", ["--set", "train.prompts={ws}/prompts/empty.txt"], ["empty.txt", "one prompt per line"]),
    Case("prompts-not-utf8", ["--set", "train.prompts={ws}/prompts/latin1.txt"], ["latin1.txt", "re-save it as UTF-8"]),
    Case("prompts-file-oversized", ["--set", "train.prompts={ws}/prompts/huge.txt"], ["huge.txt", "split it"]),
    Case("prompt-too-long", ["--set", "train.prompts={ws}/prompts/longline.txt"], ["longline.txt", "shorten it"]),
    Case("prompts-missing", ["--set", "eval.prompts={ws}/prompts/gone.txt"], ["gone.txt", "give a .txt"]),
    Case("prompts-is-a-directory", ["--set", "train.prompts={ws}/prompts/adir.txt"], ["is a directory", "give a"]),
    Case("prompts-bad-jsonl", ["--set", "train.prompts={ws}/prompts/bad.jsonl"], ["bad.jsonl:2", "each line needs"]),
    Case("prompts-csv-no-column", ["--set", "train.prompts={ws}/prompts/nocol.csv"], ["nocol.csv", "'prompt' column"]),
    Case("prompts-csv-oversized-field", ["--set", "train.prompts={ws}/prompts/hugefield.csv"],
         ["hugefield.csv", "save it as plain"]),
    Case("prompts-unknown-category", ["--set", "eval.prompts=general:nope"], ["'nope'", "use general:all"]),
    # ---------------------------------------------------------------------------------------------- offline data
    Case("offline-corrupt-image", ["--set", "srpo.offline_data={ws}/offline/corrupt"], ["img1.png", "replace or remove"]),
    Case("offline-truncated-image", ["--set", "srpo.offline_data={ws}/offline/truncated"],
         ["img0.png", "corrupt or truncated"]),
    Case("offline-missing-caption", ["--set", "srpo.offline_data={ws}/offline/nocaption"],
         ["img1.txt", "add one or remove the image"]),
    Case("offline-orphan-caption", ["--set", "srpo.offline_data={ws}/offline/orphan"],
         ["stray.txt", "add the image or remove the caption"]),
    Case("offline-two-images-one-caption", ["--set", "srpo.offline_data={ws}/offline/shared"],
         ["img0.txt", "rename one"]),
    Case("offline-empty-caption", ["--set", "srpo.offline_data={ws}/offline/emptycap"], ["img0.txt", "is empty"]),
    Case("offline-decompression-bomb", ["--set", "srpo.offline_data={ws}/offline/bomb"], ["img2.png", "downscale"]),
    Case("offline-manifest-missing-image", ["--set", "srpo.offline_data={ws}/offline/manifest/manifest.jsonl"],
         ["missing.png", "does not exist"]),
    Case("offline-not-a-dataset", ["--set", "srpo.offline_data={ws}/offline/notes.md"],
         ["notes.md", "neither a folder of images nor a .jsonl manifest"]),
    # ---------------------------------------------------------------------------------------------- run dir
    Case("existing-run-dir", ["--set", "run.output_dir={ws}/run"], ["already exists", "pass --resume"]),
    Case("resume-and-overwrite", ["--set", "run.output_dir={ws}/run", "--resume", "--overwrite"],
         ["--resume and --overwrite", "pass --resume"]),
    Case("output-dir-is-a-file", ["--set", "run.output_dir={ws}/afile"], ["is a file", "choose a directory"]),
    Case("output-dir-under-a-file", ["--set", "run.output_dir={ws}/afile/run"],
         ["cannot write to run directory", "choose a writable"]),
    Case("output-dir-unwritable", ["--set", "run.output_dir={ws}/locked/run"],
         ["cannot write to run directory", "choose a writable"], writable_check=True),
    Case("resume-without-run-dir", ["--set", "run.output_dir={ws}/nothing-here", "--resume"],
         ["does not exist", "start without --resume"]),
    # ---------------------------------------------------------------------------------------------- resume
    Case("resume-different-config", ["--set", "run.output_dir={ws}/run", "--set", "train.learning_rate=2e-3",
                                     "--resume"], ["different config", "resume with the run's own config"]),
    Case("resume-different-model", ["--set", "run.output_dir={ws}/run", "--set",
                                    "model.path={ws}/models/other-world/generator", "--resume"],
         ["different model", "start a new run"]),
    Case("resume-corrupt-checkpoint", ["--set", "run.output_dir={ws}/run-corrupt", "--resume"],
         ["unreadable", "delete it"]),
    Case("resume-no-checkpoint", ["--set", "run.output_dir={ws}/run-nockpt", "--resume"],
         ["no complete checkpoint", "start without --resume"]),
    # issue 16 item 14: tiny-offline before its data is made says how to make it
    Case("offline-data-folder-missing",
         ["--config", "tiny-offline", "--set", "srpo.offline_data={ws}/offline/tiny-real"],
         ["offline/tiny-real' does not exist", "python -m directalign.world.export_images --out"]),
    # issue 16 item 17: W&B logging, held-out samples during training, --resume RUN_DIR (wandb is in no extra of
    # the package, so it is not installed here; tests/test_logging_wandb.py checks the same with wandb hidden)
    Case("wandb-not-installed", ["--set", "run.wandb=true"],
         ["run.wandb=true needs the wandb package", "pip install wandb"]),
    Case("wandb-project-empty", ["--set", "run.wandb=true", "--set", "run.wandb_project="],
         ["run.wandb_project: empty", "set run.wandb=false"]),
    Case("sample-every-negative", ["--set", "run.sample_every=-1"], ["run.sample_every", "must be >= 0"]),
    Case("resume-run-dir-changes-trajectory", ["--resume", "{ws}/run", "--set", "train.learning_rate=2e-3"],
         ["--set train.learning_rate=0.002 changes the run's trajectory", "start a new run"]),
    Case("resume-run-dir-other-output-dir", ["--resume", "{ws}/run"], ["names another directory", "drop that --set"]),
    Case("resume-run-dir-with-config", ["--resume", "{ws}/run", "--config", "tiny-srpo"],
         ["own config.yaml", "drop --config"]),
    Case("resume-run-dir-missing", ["--resume", "{ws}/nothing-here"],
         ["does not exist", "run.output_dir of a training run"]),
    Case("resume-run-dir-not-a-run", ["--resume", "{ws}/configs"],
         ["no config.yaml", "run.output_dir of a training run"]),
    Case("resume-run-dir-is-a-file", ["--resume", "{ws}/afile"], ["is a file", "run.output_dir of a training run"]),
    # issue 16 items 8-12: weights files with code, device / tensorboard, paths checked before loading, wording
    # (tensorboard is in no test extra, so it is not installed here; tests/test_preflight.py hides it to check the
    # same; a full disk during export cannot be a row, the run directory exists by then: tests/test_export_errors.py)
    *[Case(f"reward-weights-with-code-{kind}", ["--set", f"reward.kind={kind}", "--set", f"reward.path={{ws}}/models/"
                                                f"{name}", "--set", "reward.form=absolute",
                                                "--set", "reward.tokenizer={world}/reward",
                                                "--set", "reward.clip_backbone={world}/reward",
                                                "--set", "reward.siglip_backbone={ws}/models/siglip"],
           [name, "refused, nothing in it ran", ".safetensors"])
      for kind, name in (("hpsv2", "pickled.pt"), ("imagereward", "pickled.pt"), ("aesthetic", "pickled.pth"),
                         ("aesthetic-v25", "pickled.pth"))],
    Case("device-unknown", ["--set", "model.device=tpu"], ["model.device='tpu'", "cpu | cuda | cuda:N | auto | mps"]),
    Case("tensorboard-not-installed", ["--set", "run.tensorboard=true"],
         ["run.tensorboard=true needs the tensorboard package", "pip install directalign[tensorboard]"]),
    Case("resolution-not-multiple-odd", ["--set", "model.height=33"], ["model.height=33", "use 32"]),
    Case("model-hub-id-offline", ["--set", "model.path=nobody/no-such-model"],
         ["model.path 'nobody/no-such-model'", "not in the local Hugging Face cache", "set model.path=DIR"]),
    Case("reward-hub-id-offline", ["--set", "reward.kind=clip", "--set", "reward.path=nobody/no-reward"],
         ["reward.path 'nobody/no-reward'", "hf download nobody/no-reward", "set reward.path=DIR"]),
    Case("reward-backbone-hub-id-offline", ["--set", "reward.kind=aesthetic", "--set", "reward.form=absolute",
                                            "--set", "reward.path={ws}/models/pickled.pth",
                                            "--set", "reward.clip_backbone=nobody/no-backbone"],
         ["reward.clip_backbone 'nobody/no-backbone'", "set reward.clip_backbone=DIR"]),
    Case("reward-head-missing", ["--set", "reward.kind=aesthetic", "--set", "reward.form=absolute",
                                 "--set", "reward.path={ws}/models/no-head.pth"], ["no-head.pth", "does not exist"]),
    Case("reward-tokenizer-offline", ["--set", "reward.kind=imagereward",
                                      "--set", "reward.path={ws}/models/pickled.pt"],
         ["reward.tokenizer 'bert-base-uncased'", "set reward.tokenizer=DIR"]),
    Case("config-is-a-directory", ["--config", "{ws}/run"], ["is a directory", "pass a YAML file", "config.yaml"]),
    Case("key-of-another-section", ["--set", "train.device=cuda"], ["'train.device'", "use model.device"]),
    Case("offline-float-image-out-of-range",  # a float TIFF with values up to 2 (tests/data/offline-float-range)
         ["--set", "srpo.offline_data=" + str(Path(__file__).resolve().parents[1] / "data" / "offline-float-range"
                                              / "manifest.jsonl")],
         ["hdr.tiff", "32-bit float image with values in [0, 2], outside [0, 1]", "save it as an 8- or 16-bit PNG"]),
    # issue 16 item 4: --resume below the checkpoint, or with a decaying schedule re-spanned
    Case("resume-steps-below-checkpoint", ["--set", "run.output_dir={ws}/run-cosine", "--set", "train.steps=1",
                                           "--set", "train.lr_schedule=cosine", "--resume"],
         ["checkpoint is at step 2", "past train.steps=1", "set train.steps to 2 or more"]),
    Case("resume-respans-decaying-schedule", ["--set", "run.output_dir={ws}/run-cosine", "--set", "train.steps=5",
                                              "--set", "train.lr_schedule=cosine", "--resume"],
         ["decays over train.steps", "keep train.steps=3"]),
    # issue 16 item 12: compare / eval name their arguments as the user typed them
    Case("compare-missing-model", ["{ws}/nope", "base", "--out", "{ws}/cmp-out"], ["compare MODEL", "does not exist"],
         command="compare"),
    Case("compare-one-model", ["base", "--out", "{ws}/cmp-out"], ["MODEL"], command="compare"),
    Case("eval-baseline-missing", ["--model", "base", "--baseline", "{ws}/nope", "--out", "{ws}/eval-out"],
         ["--baseline", "does not exist"], command="eval"),
    # issue 14: steering options
    Case("steer-option-of-another-steerer", ["--model", "tiny-world", "--steer", "reno", "--steer-n", "4", "--out",
                                             "{ws}/steer-out"],
         ["--steer-n applies to --steer best-of-n / noise-search / fk only", "not reno"], command="sample"),
    Case("steer-bad-choice", ["--model", "tiny-world", "--steer", "fk", "--steer-potential", "min", "--out",
                              "{ws}/steer-out"], ["--steer-potential must be one of max, add, diff"], command="sample"),
    Case("steer-out-of-range", ["--model", "tiny-world", "--steer", "fk", "--steer-resample-start", "0.9",
                                "--steer-resample-end", "0.5", "--out", "{ws}/steer-out"],
         ["--steer-resample-end must be >= --steer-resample-start"], command="sample"),
    Case("steer-option-without-steer", ["--model", "tiny-world", "--steer-iterations", "3", "--out", "{ws}/steer-out"],
         ["--steer-iterations needs --steer"], command="sample"),
]


def test_there_are_enough_cases():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, ws, random_world_dir, monkeypatch, capsys):
    fill = {"ws": str(ws), "world": str(random_world_dir)}
    if case.writable_check and os.access(ws / "locked", os.W_OK):
        # root ignores the mode bits; sysfs refuses everyone a new directory (EPERM), so the case still runs
        fill["ws"] = "/sys/directalign-unwritable"
    if case.id == "device-without-cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setenv("DIRECTALIGN_WORLD_DIR", str(random_world_dir))
    for k, v in case.env.items():
        monkeypatch.setenv(k, v.format(**fill))
    args = [a.format(**fill) for a in case.args]
    argv = (["train", *_sets(FAST + [f"run.output_dir={ws / 'new-run'}"])] + args if case.command == "train"
            else [case.command, *args])
    before = _fingerprint(ws, random_world_dir)
    try:
        code = main(argv)
    finally:
        created = (ws / "new-run").exists()
        shutil.rmtree(ws / "new-run", ignore_errors=True)  # so that one failure does not fail the cases after it
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in out and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    line = lines[0]
    assert line.startswith("directalign: error: "), line
    for needle in case.needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert not created, "the new run directory was created"
    assert _fingerprint(ws, random_world_dir) == before, "an existing file or directory changed"
    assert not _held_locks(ws), "a lock was left held"
