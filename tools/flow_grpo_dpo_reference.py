"""Golden data for ``tests/methods/test_flow_grpo_dpo_reference.py``: Flow-GRPO's Diffusion-DPO step, run by its own
code on tiny seeded CPU inputs.

The loss of ``yifan123/flow_grpo@ac4c86e8cae021841f1fde853d340e0db67690dd`` lives inside the training loop of
``scripts/train_sd3_dpo.py`` (the body of ``with accelerator.accumulate(transformer):``, lines 881-950, from
``model_input = sample["latents"]`` to the ``implicit_acc`` logging), which needs CUDA, absl, wandb, peft and SD3 to
run as a script. This tool parses that file with :mod:`ast`, takes the statements of that block that come before
``accelerator.backward(loss)`` and the module's ``get_sigmas`` function, and executes them unchanged; nothing of the
reference is stored in this repository, only its inputs and outputs. What the block calls is real where it can be:
diffusers' ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (SD3.5's training schedule, 1000 levels) and
``compute_density_for_timestep_sampling``; the transformer is a stand-in (a per-pixel linear map of the noisy latent
plus a timestep term, with a "learner" and a "ref" set of weights switched by ``set_adapter`` as the LoRA adapters
are), ``autocast`` is ``contextlib.nullcontext`` (the script's choice with LoRA). ``beta = 100`` is
``config/dpo.py``'s. The block draws its noise and timesteps from the global RNG, seeded here. Needs torch, diffusers
and safetensors; the project itself is not imported::

    git clone https://github.com/yifan123/flow_grpo /tmp/flow_grpo
    git -C /tmp/flow_grpo checkout ac4c86e8cae021841f1fde853d340e0db67690dd
    python tools/flow_grpo_dpo_reference.py /tmp/flow_grpo   # writes tests/data/flow_grpo_dpo_reference/

What it writes: ``config.json`` (beta, shift, the seeds of the inputs and of the block's global RNG, the source, the
versions) and ``reference.safetensors`` with

* inputs: ``latents`` (2P, C, H, W: P winners then P losers), the stand-in's weights ``learner_w`` / ``learner_u`` /
  ``ref_w`` / ``ref_u``;
* the block's own draws and intermediates: ``noise`` (winner and loser share it), ``u`` (the logit-normal draw),
  ``timesteps``, ``sigmas`` (2P,), ``noisy_model_input``, ``model_pred``, ``model_pred_ref``, ``theta_mse``,
  ``ref_mse``, ``inside_term``;
* outputs: ``loss``, ``implicit_acc`` and ``grad_model_pred`` (the gradient of ``loss`` with respect to the
  learner's prediction; the reference's prediction is detached by the code).
"""

from __future__ import annotations

import ast
import contextlib
import json
import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import diffusers
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling
from reference_ast import accumulate_body, before_backward, function_source
from safetensors.torch import save_file

COMMIT = "ac4c86e8cae021841f1fde853d340e0db67690dd"
FILE = "scripts/train_sd3_dpo.py"
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "flow_grpo_dpo_reference"
BETA, SHIFT, PAIRS, SEED, BLOCK_SEED = 100.0, 3.0, 3, 4, 2311
FIRST = 'model_input = sample["latents"]'


def extract(source: str) -> tuple[str, str]:
    """``get_sigmas``'s definition and the loss statements (the accumulate block up to ``accelerator.backward``)."""
    body = accumulate_body(source, FILE)
    if ast.unparse(body[0]) != ast.unparse(ast.parse(FIRST)):
        raise SystemExit(f"the accumulate block does not start with {FIRST!r}: another commit's layout")
    return function_source(source, "get_sigmas", FILE), before_backward(body, FILE)


class StandIn:
    """The transformer: ``pred = W @ x (over channels) + u * timestep / 1000`` with the active adapter's weights."""

    def __init__(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.weights, self.active, self.outputs = weights, "learner", {}

    def set_adapter(self, name: str) -> None:
        self.active = name

    def __call__(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
        w, u = self.weights[self.active]
        pred = torch.einsum("oc,bchw->bohw", w, hidden_states) + (timestep / 1000).view(-1, 1, 1, 1) * u.view(
            1, -1, 1, 1)
        if pred.requires_grad:
            pred.retain_grad()
        self.outputs[self.active] = pred
        return (pred,)


def main(flow_grpo_dir: str) -> None:
    source = (Path(flow_grpo_dir) / FILE).read_text(encoding="utf-8")
    get_sigmas_src, block = extract(source)
    g = torch.Generator().manual_seed(SEED)
    c = 4
    latents = torch.randn(2 * PAIRS, c, 4, 4, generator=g)
    ref_w, ref_u = torch.randn(c, c, generator=g) / 2, torch.randn(c, generator=g)
    # the learner near the reference (a LoRA after some steps): |inside| stays O(1) at beta = 100
    learner_w = (ref_w + 0.03 * torch.randn(c, c, generator=g)).requires_grad_(True)
    learner_u = (ref_u + 0.03 * torch.randn(c, generator=g)).requires_grad_(True)
    transformer = StandIn({"learner": (learner_w, learner_u), "ref": (ref_w, ref_u)})
    env = {"torch": torch, "F": F, "compute_density_for_timestep_sampling": compute_density_for_timestep_sampling,
           "noise_scheduler": FlowMatchEulerDiscreteScheduler(shift=SHIFT),
           "accelerator": SimpleNamespace(device=torch.device("cpu")), "autocast": contextlib.nullcontext,
           "pipeline": SimpleNamespace(transformer=transformer), "transformer": transformer,
           "sample": {"latents": latents}, "embeds": None, "pooled_embeds": None,
           "config": SimpleNamespace(train=SimpleNamespace(beta=BETA)), "info": defaultdict(list)}
    exec(get_sigmas_src, env)  # noqa: S102 - the reference's own function, read from the checkout on the command line
    torch.manual_seed(BLOCK_SEED)  # the block's torch.randn_like and torch.normal (timesteps) use the global RNG
    exec(block, env)  # noqa: S102 - the reference's own statements
    loss = env["loss"]
    loss.backward()
    model_pred = transformer.outputs["learner"]
    out = {"latents": latents, "learner_w": learner_w, "learner_u": learner_u, "ref_w": ref_w, "ref_u": ref_u,
           "noise": env["noise"], "u": env["u"], "timesteps": env["timesteps"], "sigmas": env["sigmas"].flatten(),
           "noisy_model_input": env["noisy_model_input"], "model_pred": model_pred,
           "model_pred_ref": env["model_pred_ref"], "theta_mse": env["theta_mse"], "ref_mse": env["ref_mse"],
           "inside_term": env["inside_term"], "loss": loss.reshape(1), "implicit_acc": env["implicit_acc"].reshape(1),
           "grad_model_pred": model_pred.grad}
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().float() for k, v in out.items()}, str(OUT / "reference.safetensors"))
    config = {"source": f"yifan123/flow_grpo@{COMMIT} {FILE}", "beta": BETA, "shift": SHIFT, "pairs": PAIRS,
              "seed": SEED, "block_seed": BLOCK_SEED,
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__}}
    (OUT / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote {OUT}: loss {float(loss.detach()):.6f}, inside {env['inside_term'].tolist()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tools/flow_grpo_dpo_reference.py <flow_grpo checkout>")
    main(sys.argv[1])
