import json, time
import pytest, torch
from helpers import quiet, tiny_config
from directalign.engine import finetune as ft_mod
from directalign.logging_utils import read_metrics
from directalign.methods.registry import METHODS
from directalign.training import train
from directalign import training


@pytest.mark.parametrize("method", list(METHODS))
def test_measure(random_world, tmp_path, method, monkeypatch):
    snap = {}
    orig = ft_mod.FineTuning.setup.__func__

    def setup(cls, t, adapter, info):
        ft = orig(cls, t, adapter, info)
        snap.update({k: v.detach().clone() for k, v in ft_mod.trainable_state(t.finetune, adapter.transformer).items()})
        return ft

    monkeypatch.setattr(ft_mod.FineTuning, "setup", classmethod(setup))
    t0 = time.time()
    res = train(tiny_config(method, "train.steps=3", run_dir=tmp_path / "run"), log=quiet)
    dt = time.time() - t0
    rec = read_metrics(tmp_path / "run")
    final = ft_mod.trainable_state("lora", res.adapter.transformer)
    ch = {k: float((final[k].float() - snap[k].float()).abs().max()) for k in snap}
    mins = sorted(ch.items(), key=lambda kv: kv[1])[:3]
    out = {"method": method, "secs": dt, "vals": [(r["loss"], r["reward"], r["grad_norm"]) for r in rec],
           "keys": sorted(set(rec[0]) - {"step","loss","reward","grad_norm","lr","step_seconds","skipped","nfe_no_grad","nfe_grad"}),
           "min_change": mins, "n": len(snap)}
    with open("/tmp/work/measure.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")
