"""Everything checkable without a model is checked before anything loads (issue 16, items 9-12).

``train`` calls :func:`directalign.preflight.check` first. With the loaders replaced by ones that fail the test,
each bad input still gets its one-line error: so it is found before the generator (or the reward) loads. Hub ids
are resolved against a fake Hugging Face cache in ``tmp_path``; nothing touches the network (the conftest fixture
refuses sockets and sets ``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import huggingface_hub.constants as hf_constants
import pytest
import torch
from helpers import tiny_config

from directalign import hub, preflight
from directalign.adapters.loading import FAMILIES, load_adapter, vae_config
from directalign.cli import main
from directalign.engine.finetune import resolve_device
from directalign.errors import TrainingError, UserError


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache; ``add(repo_id, src_dir)`` puts a snapshot of ``src_dir`` in it."""
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(root))

    def add(repo_id: str, src: Path) -> Path:
        repo = root / ("models--" + repo_id.replace("/", "--"))
        commit = "0123456789abcdef0123456789abcdef01234567"
        shutil.copytree(src, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
        return repo / "snapshots" / commit

    return add


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model or a reward fails the test: a preflight error must come first."""
    import directalign.training as training

    def refuse(*_a, **_k):
        raise AssertionError("a model or reward was loaded before the bad input was reported")

    monkeypatch.setattr(training, "load_adapter", refuse)
    monkeypatch.setattr(training, "load_reward", refuse)


def _train_error(cfg) -> str:
    from directalign.training import train

    with pytest.raises(UserError) as e:
        train(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------------- item 9: device
@pytest.mark.parametrize("name", ["tpu", "cuda:x", "cpu:0", "xla", "gpu", ""])
def test_a_device_torch_does_not_know_is_one_line_listing_the_choices(name):
    with pytest.raises(TrainingError, match=r"not a device directalign can use; choose one of cpu \| cuda \| "
                                            r"cuda:N \| auto \| mps"):
        resolve_device(name)


def test_known_devices_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="no CUDA device"):
            resolve_device("cuda:1")


# ------------------------------------------------------------------------------------------- item 9: tensorboard
def _without_tensorboard(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.split(".")[0] == "tensorboard" else real(name, *a, **k))


def test_tensorboard_without_the_package_is_one_line_before_anything_loads(monkeypatch, tmp_path, no_loading):
    _without_tensorboard(monkeypatch)
    msg = _train_error(tiny_config("srpo", "run.tensorboard=true", run_dir=tmp_path / "run"))
    assert "run.tensorboard=true" in msg and "pip install directalign[tensorboard]" in msg
    assert not (tmp_path / "run").exists()


def test_tensorboard_without_the_package_through_the_cli(monkeypatch, tmp_path, random_world, capsys):
    """The bad-input table's contract (one stderr line, exit 2, nothing created) for a case the table cannot hold:
    whether tensorboard is installed is not an input the table can set."""
    _without_tensorboard(monkeypatch)
    code = main(["train", "--set", f"run.output_dir={tmp_path / 'run'}", "--set", "run.tensorboard=true"])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err
    assert err.strip().splitlines() == [err.strip()] and "pip install directalign[tensorboard]" in err
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- item 11: before loading
@pytest.mark.parametrize("overrides, needles", [
    (["model.height=33"], ["model.height=33", "not a multiple of 4", "use 32"]),
    (["model.width=30"], ["model.width=30", "use 28"]),
    (["model.device=tpu"], ["model.device='tpu'", "cpu | cuda | cuda:N | auto | mps"]),
    (["reward.kind=clip", "reward.path={tmp}/no-reward"], ["reward.path", "no-reward", "does not exist"]),
    (["reward.kind=aesthetic", "reward.form=absolute", "reward.path={tmp}/head.pth"], ["head.pth", "does not exist"]),
    (["reward.kind=clip", "reward.path=nobody/no-reward"], ["reward.path 'nobody/no-reward'", "set reward.path=DIR"]),
    (["model.path=nobody/no-model"], ["model.path 'nobody/no-model'", "set model.path=DIR", "HF_HOME"]),
    (["model.path={tmp}/no-model"], ["model.path", "no-model", "does not exist"]),
])
def test_bad_inputs_are_reported_before_anything_loads(overrides, needles, tmp_path, random_world, no_loading):
    cfg = tiny_config("srpo", *[o.format(tmp=tmp_path) for o in overrides], run_dir=tmp_path / "run")
    msg = _train_error(cfg)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert not (tmp_path / "run").exists()


def _unwritable(tmp_path) -> Path:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores the mode bits; sysfs refuses everyone a new directory
        return Path("/sys/directalign-unwritable/run")
    return locked / "run"


def test_an_unwritable_run_directory_is_reported_before_anything_loads(tmp_path, random_world, no_loading):
    out = _unwritable(tmp_path)
    try:
        msg = _train_error(tiny_config("srpo", run_dir=out))
    finally:
        (tmp_path / "locked").chmod(0o700)
    assert "cannot write to run directory" in msg and "choose a writable run.output_dir" in msg


def test_the_writability_probe_leaves_nothing_behind(tmp_path):
    preflight.check_writable(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "afile").write_text("x")
    with pytest.raises(TrainingError, match="cannot write to run directory"):
        preflight.check_writable(tmp_path / "afile" / "run")


def test_the_resolution_multiple_is_known_before_loading(random_world):
    """The family registry's multiple, from the VAE config alone, is what the loaded adapter enforces."""
    flux = FAMILIES["flux"]
    assert flux.resolution_multiple() == 16  # FLUX.1: 4 VAE levels (factor 8) x 2x2 packing
    assert flux.resolution_multiple({"block_out_channels": [128, 256, 512, 512]}) == 16
    assert FAMILIES["qwen-image"].resolution_multiple({"temperal_downsample": [False, True, True]}) == 16
    assert FAMILIES["sd3"].resolution_multiple({"block_out_channels": [1, 2]}) == 4
    cfg = tiny_config("srpo")
    adapter = load_adapter(cfg.model, torch.device("cpu"), torch.float32)
    assert flux.resolution_multiple(vae_config(random_world / "generator")) == adapter.resolution_multiple == 4


# ------------------------------------------------------------------------------------------- item 10: hub ids
def test_an_uncached_hub_id_offline_fails_at_once_with_how_to_provide_a_copy(tmp_path, hf_cache, no_loading):
    t0 = time.time()
    msg = _train_error(tiny_config("srpo", "reward.kind=pickscore", "reward.path=yuvalkirstain/PickScore_v1",
                                   run_dir=tmp_path / "run"))
    assert time.time() - t0 < 5
    assert "reward.path 'yuvalkirstain/PickScore_v1'" in msg and "HF_HUB_OFFLINE=1" in msg
    assert "hf download yuvalkirstain/PickScore_v1 --local-dir DIR" in msg and "set reward.path=DIR" in msg


def test_no_network_is_found_at_once_too(tmp_path, hf_cache, monkeypatch, no_loading):
    """Hub not switched off, but unreachable (the socket guard refuses the one probe): the same single line."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    assert not hub.offline()
    msg = _train_error(tiny_config("srpo", "model.path=black-forest-labs/FLUX.1-dev", run_dir=tmp_path / "run"))
    assert "model.path 'black-forest-labs/FLUX.1-dev'" in msg and "cannot be reached (no network)" in msg


def test_every_path_a_reward_reads_is_checked(tmp_path, hf_cache, random_world, no_loading):
    head = tmp_path / "head.pth"
    torch.save({}, head)
    cases = [
        (["reward.kind=aesthetic", f"reward.path={head}"], "reward.clip_backbone 'openai/clip-vit-large-patch14'"),
        (["reward.kind=aesthetic-v25", f"reward.path={head}"], "reward.siglip_backbone 'google/siglip-so400m"),
        (["reward.kind=imagereward", f"reward.path={head}"], "reward.tokenizer 'bert-base-uncased'"),
        (["reward.kind=hpsv2", f"reward.path={head}"], "reward.tokenizer 'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'"),
        (["reward.kind=hpsv2", f"reward.path={tmp_path / 'HPS_v2.1_compressed.pt'}"], "does not exist"),
        (["reward.kind=sum", "reward.terms.kinds=[clip, aesthetic]",
          f"reward.terms.paths=[{random_world / 'reward'}, {tmp_path / 'gone.pth'}]"], "reward.terms.paths[1]"),
        (["reward.kind=clip", f"reward.path={random_world / 'generator'}"], "reward.path: "),
        (["reward.kind=aesthetic", f"reward.path={head}", f"reward.clip_backbone={random_world / 'generator'}"],
         "reward.clip_backbone: "),
    ]
    for overrides, needle in cases:
        msg = _train_error(tiny_config("srpo", "reward.form=absolute", *overrides, run_dir=tmp_path / "run"))
        assert needle in msg, (overrides, msg)


def test_a_reward_without_a_tokenizer_falls_back_as_its_loader_does(tmp_path, hf_cache, random_world, no_loading):
    """PickScore takes the tokenizer from reward.path, else from laion/CLIP-ViT-H-14 (which must then be there)."""
    bare = tmp_path / "pickscore"
    shutil.copytree(random_world / "reward", bare)
    for f in bare.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            f.unlink()
    msg = _train_error(tiny_config("srpo", "reward.kind=pickscore", f"reward.path={bare}", run_dir=tmp_path / "run"))
    assert "reward.tokenizer 'laion/CLIP-ViT-H-14-laion2B-s32B-b79K'" in msg
    msg = _train_error(tiny_config("srpo", "reward.kind=clip", f"reward.path={bare}", run_dir=tmp_path / "run"))
    assert "holds no tokenizer" in msg and "set reward.tokenizer" in msg


def test_cached_hub_ids_pass_and_load_offline(tmp_path, hf_cache, random_world):
    """A hub id whose snapshot is in the cache passes, and the reward then really loads from it offline."""
    from directalign.rewards.registry import load_reward

    hf_cache("someone/tiny-clip", random_world / "reward")
    hf_cache("someone/tiny-flux", random_world / "generator")
    cfg = tiny_config("srpo", "reward.kind=clip", "reward.path=someone/tiny-clip", "model.path=someone/tiny-flux",
                      "model.height=34", run_dir=tmp_path / "run")
    with pytest.raises(TrainingError, match="model.height=34 is not a multiple of 4"):  # the cached VAE's multiple
        preflight.check(cfg)
    cfg.model.height = 32
    preflight.check(cfg)
    assert load_reward(cfg.reward, "cpu", "absolute").name == "clip"


def test_an_incomplete_cached_model_is_reported(tmp_path, hf_cache, random_world):
    snap = hf_cache("someone/partial-flux", random_world / "generator")
    shutil.rmtree(snap / "vae")
    cfg = tiny_config("srpo", "model.path=someone/partial-flux", run_dir=tmp_path / "run")
    with pytest.raises(TrainingError, match=r"someone/partial-flux.*missing.*vae.*cached copy is incomplete"):
        preflight.check(cfg)


# ------------------------------------------------------------------------------------------- item 12: wording
def test_no_message_points_at_a_stacktrace_the_user_does_not_see():
    text = ("Cannot load model nobody/x: the model is not fully cached locally and an error occurred while trying to "
            "fetch metadata from the Hub. Please check out the root cause in the stacktrace above.\nmore")
    assert hub.clean_message(ValueError(text)) == ("Cannot load model nobody/x: the model is not fully cached "
                                                   "locally and an error occurred while trying to fetch metadata "
                                                   "from the Hub.")
    assert hub.clean_message("it failed (see the traceback above)") == "it failed"


def test_the_hub_id_load_message_has_no_stacktrace_advice(random_world):
    """Straight to the loader (no preflight): diffusers' own offline error, cleaned."""
    cfg = tiny_config("srpo", "model.path=nobody/no-such-model")
    with pytest.raises(TrainingError) as e:
        load_adapter(cfg.model, torch.device("cpu"), torch.float32)
    msg = str(e.value)
    assert "nobody/no-such-model" in msg and "stacktrace" not in msg.lower() and "\n" not in msg
