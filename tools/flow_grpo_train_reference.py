"""Golden data for ``tests/methods/test_flow_grpo_train_reference.py``: Flow-GRPO's training-step loss (log-prob
under the current policy, ratio, PPO clip with clipped advantages, the KL to the reference and the logged
diagnostics), run by its own code on tiny seeded CPU inputs.

The loss of ``yifan123/flow_grpo@ac4c86e8cae021841f1fde853d340e0db67690dd`` lives inside the training loop of
``scripts/train_sd3.py`` (the body of ``with accelerator.accumulate(transformer):``, lines 873-931: ``compute_log_prob``
for the policy and, with ``train.beta > 0``, for the reference under ``transformer.module.disable_adapter()``, then
``advantages``, ``ratio``, ``unclipped_loss``, ``clipped_loss``, ``policy_loss``, ``kl_loss``, ``loss`` and the
``approx_kl`` / ``clipfrac`` logging), which needs CUDA, absl, wandb and SD3 to run as a script. This tool parses that
file with :mod:`ast`, takes the statements of that block before ``accelerator.backward(loss)`` and the module's
``compute_log_prob`` function, loads ``sde_step_with_logprob`` from
``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py`` with importlib, and executes them unchanged; nothing of
the reference is stored in this repository, only its inputs and outputs. The scheduler is diffusers'
``FlowMatchEulerDiscreteScheduler(shift=3.0)`` with 10 steps (flow_grpo's ``config/grpo.py`` SD3.5
``sample.num_steps``); the transformer is a stand-in (a per-pixel linear map of the latent
plus a timestep term; ``disable_adapter`` switches to the reference's weights, as the LoRA-off base model);
``autocast`` is ``contextlib.nullcontext``; ``train.cfg = False`` (one conditional pass). Settings: ``noise_level``
0.7, ``clip_range`` 1e-4, ``adv_clip_max`` 5 (``config/base.py``), ``beta`` 0.04 (``config/grpo.py``). The old
log-probs are the current ones minus chosen offsets so that the four rows exercise the clip bound from above (positive
advantage, no gradient), from below, a clipped advantage (-7 -> -5) and a ratio inside the range. Needs torch,
diffusers and safetensors; the project itself is not imported::

    git clone https://github.com/yifan123/flow_grpo /tmp/flow_grpo
    git -C /tmp/flow_grpo checkout ac4c86e8cae021841f1fde853d340e0db67690dd
    python tools/flow_grpo_train_reference.py /tmp/flow_grpo   # writes tests/data/flow_grpo_train_reference/

What it writes: ``config.json`` (settings, the scheduler's sigmas, each row's step index, the source, the versions)
and ``reference.safetensors`` with the inputs ``latents``, ``next_latents`` (B, C, H, W), ``timesteps``,
``old_log_probs``, ``advantages`` (B,; before clipping), the predictions ``noise_pred`` / ``noise_pred_ref`` and the
outputs ``log_prob``, ``prev_sample_mean``, ``prev_sample_mean_ref``, ``std_dev_t`` (B,), ``ratio``,
``policy_loss``, ``kl_loss``, ``loss``, ``approx_kl``, ``clipfrac`` and ``grad_noise_pred`` (the gradient of ``loss``
with respect to the policy's prediction).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from reference_ast import accumulate_body, before_backward, function_source
from safetensors.torch import save_file

COMMIT = "ac4c86e8cae021841f1fde853d340e0db67690dd"
FILE = "scripts/train_sd3.py"
SDE_FILE = "flow_grpo/diffusers_patch/sd3_sde_with_logprob.py"
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "flow_grpo_train_reference"
SETTINGS = {"shift": 3.0, "steps": 10, "noise_level": 0.7, "clip_range": 1e-4, "adv_clip_max": 5.0, "beta": 0.04}
ROWS = (0, 3, 6, 8)  # step indices; 0 is sigma = 1, where sde_step_with_logprob substitutes sigmas[1]
ADVANTAGES = (1.3, 0.8, -7.0, -0.4)
OFFSETS = (0.02, -0.03, 0.01, 5e-5)  # log p - log p_old per row
SEED = 873


def extract(source: str) -> tuple[str, str]:
    """``compute_log_prob``'s definition and the loss statements (the accumulate block before the backward)."""
    block = before_backward(accumulate_body(source, FILE), FILE)
    for name in ("ratio", "unclipped_loss", "clipped_loss", "policy_loss", "kl_loss"):
        if f"{name} = " not in block:
            raise SystemExit(f"the accumulate block does not compute {name}: another commit's layout")
    return function_source(source, "compute_log_prob", FILE), block


class StandIn:
    """The transformer (``pred = W @ x (over channels) + u * timestep / 1000``); ``module.disable_adapter()`` switches
    to the reference's weights."""

    def __init__(self, policy: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]):
        self.weights, self.active, self.outputs, self.module = {"policy": policy, "ref": ref}, "policy", {}, self

    @contextlib.contextmanager
    def disable_adapter(self):
        self.active = "ref"
        try:
            yield
        finally:
            self.active = "policy"

    def __call__(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
        w, u = self.weights[self.active]
        pred = torch.einsum("oc,bchw->bohw", w, hidden_states) + (timestep / 1000).view(-1, 1, 1, 1) * u.view(
            1, -1, 1, 1)
        if pred.requires_grad:
            pred.retain_grad()
        self.outputs[self.active] = pred
        return (pred,)


def main(flow_grpo_dir: str) -> None:
    root = Path(flow_grpo_dir)
    fn_src, block = extract((root / FILE).read_text(encoding="utf-8"))
    spec = importlib.util.spec_from_file_location("flow_grpo_sde", root / SDE_FILE)
    sde = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sde)
    s = SETTINGS
    scheduler = FlowMatchEulerDiscreteScheduler(shift=s["shift"])
    scheduler.set_timesteps(s["steps"])
    g = torch.Generator().manual_seed(SEED)
    b, c = len(ROWS), 4
    latents = torch.randn(b, c, 4, 4, generator=g)
    ref_w, ref_u = torch.randn(c, c, generator=g) / 2, torch.randn(c, generator=g)
    policy_w = (ref_w + 0.05 * torch.randn(c, c, generator=g)).requires_grad_(True)
    policy_u = (ref_u + 0.05 * torch.randn(c, generator=g)).requires_grad_(True)
    transformer = StandIn((policy_w, policy_u), (ref_w, ref_u))
    timesteps = scheduler.timesteps[list(ROWS)]
    # the rollout's next latents: a draw of the reference's own SDE step from the policy's prediction
    with torch.no_grad():
        pred = transformer(latents, timesteps, None, None, False)[0]
        next_latents, log_prob_now, _, _ = sde.sde_step_with_logprob(
            scheduler, pred, timesteps, latents, noise_level=s["noise_level"], generator=g)
    old_log_probs = log_prob_now - torch.tensor(OFFSETS)
    advantages = torch.tensor(ADVANTAGES)
    sample = {"latents": latents[:, None], "next_latents": next_latents[:, None], "timesteps": timesteps[:, None],
              "log_probs": old_log_probs[:, None], "advantages": advantages[:, None]}
    config = SimpleNamespace(
        train=SimpleNamespace(cfg=False, beta=s["beta"], adv_clip_max=s["adv_clip_max"], clip_range=s["clip_range"]),
        sample=SimpleNamespace(noise_level=s["noise_level"], guidance_scale=4.5))
    env = {"torch": torch, "sde_step_with_logprob": sde.sde_step_with_logprob, "autocast": contextlib.nullcontext,
           "transformer": transformer, "pipeline": SimpleNamespace(scheduler=scheduler), "sample": sample, "j": 0,
           "embeds": None, "pooled_embeds": None, "config": config, "info": defaultdict(list)}
    exec(fn_src, env)  # noqa: S102 - the reference's own function, read from the checkout on the command line
    exec(block, env)  # noqa: S102 - the reference's own statements
    loss = env["loss"]
    loss.backward()
    noise_pred = transformer.outputs["policy"]
    out = {"latents": latents, "next_latents": next_latents, "timesteps": timesteps, "old_log_probs": old_log_probs,
           "advantages": advantages, "noise_pred": noise_pred, "noise_pred_ref": transformer.outputs["ref"],
           "log_prob": env["log_prob"], "prev_sample_mean": env["prev_sample_mean"],
           "prev_sample_mean_ref": env["prev_sample_mean_ref"], "std_dev_t": env["std_dev_t"].flatten(),
           "ratio": env["ratio"], "policy_loss": env["policy_loss"].reshape(1), "kl_loss": env["kl_loss"].reshape(1),
           "loss": loss.reshape(1), "approx_kl": env["info"]["approx_kl"][0].reshape(1),
           "clipfrac": env["info"]["clipfrac"][0].reshape(1), "grad_noise_pred": noise_pred.grad}
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().float() for k, v in out.items()}, str(OUT / "reference.safetensors"))
    meta = dict(SETTINGS, rows=list(ROWS), sigmas=[float(x) for x in scheduler.sigmas], seed=SEED,
                source=f"yifan123/flow_grpo@{COMMIT} {FILE} and {SDE_FILE}",
                versions={"torch": torch.__version__, "diffusers": diffusers.__version__})
    (OUT / "config.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {OUT}: loss {float(loss.detach()):.6g}, ratio {env['ratio'].tolist()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tools/flow_grpo_train_reference.py <flow_grpo checkout>")
    main(sys.argv[1])
