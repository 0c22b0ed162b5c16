"""Golden data for ``tests/methods/test_grpo_reference.py``: Flow-GRPO's own SDE step with log-probability
(``sde_step_with_logprob`` of yifan123/flow_grpo@ac4c86e ``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``), run
by its own code on tiny seeded inputs, so :func:`directalign.methods.grpo_math.sde_step` and ``gaussian_log_prob``
can be checked against the reference implementation without flow_grpo in the project's environment.

It needs flow_grpo's source and diffusers (its only dependencies beyond torch for this function); the project
itself is not imported::

    git clone https://github.com/yifan123/flow_grpo /tmp/flow_grpo && git -C /tmp/flow_grpo checkout ac4c86e
    python tools/flow_grpo_sde_reference.py /tmp/flow_grpo   # writes tests/data/flow_grpo_sde_reference/

(the committed data was made with diffusers 0.42.1 and torch 2.13.0+cpu; ``config.json`` records the versions).

What it writes: ``config.json`` (the scheduler's shift and step count, its sigmas, the noise level, the step
indices of the batch rows, the versions) and ``reference.safetensors``:

* ``sample`` (3, 4, 4, 4) and ``model_output``: seeded N(0, 1) latents and velocities; rows use the scheduler's steps
  0 (sigma = 1, where flow_grpo substitutes ``sigmas[1]``), 2 and 4;
* ``given_prev_sample``: a seeded target; ``given_log_prob`` / ``mean`` / ``std_dev_t``: the function's outputs
  for it (log-prob averaged over the non-batch elements; ``std_dev_t`` without the ``sqrt(-dt)`` factor);
* ``sampled_prev_sample`` / ``sampled_log_prob``: a draw of the function itself (a seeded generator) and its
  log-prob.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import diffusers
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "flow_grpo_sde_reference"
SHIFT, STEPS, NOISE_LEVEL, ROWS = 3.0, 6, 0.7, (0, 2, 4)


def main(flow_grpo_dir: str) -> None:
    path = Path(flow_grpo_dir) / "flow_grpo" / "diffusers_patch" / "sd3_sde_with_logprob.py"
    spec = importlib.util.spec_from_file_location("flow_grpo_sde", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    scheduler.set_timesteps(STEPS)
    g = torch.Generator().manual_seed(0)
    shape = (len(ROWS), 4, 4, 4)
    sample, model_output, target = (torch.randn(shape, generator=g) for _ in range(3))
    timesteps = scheduler.timesteps[list(ROWS)]
    _, given_lp, mean, std_dev_t = module.sde_step_with_logprob(
        scheduler, model_output, timesteps, sample, noise_level=NOISE_LEVEL, prev_sample=target)
    drawn, drawn_lp, _, _ = module.sde_step_with_logprob(
        scheduler, model_output, timesteps, sample, noise_level=NOISE_LEVEL, generator=torch.Generator().manual_seed(1))
    OUT.mkdir(parents=True, exist_ok=True)
    tensors = {"sample": sample, "model_output": model_output, "given_prev_sample": target,
               "given_log_prob": given_lp, "mean": mean, "std_dev_t": std_dev_t.reshape(-1),
               "sampled_prev_sample": drawn, "sampled_log_prob": drawn_lp}
    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()}, str(OUT / "reference.safetensors"))
    config = {"source": "yifan123/flow_grpo@ac4c86e flow_grpo/diffusers_patch/sd3_sde_with_logprob.py",
              "shift": SHIFT, "steps": STEPS, "noise_level": NOISE_LEVEL, "rows": list(ROWS),
              "sigmas": [float(s) for s in scheduler.sigmas], "versions": {"torch": torch.__version__,
                                                                         "diffusers": diffusers.__version__}}
    (OUT / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tools/flow_grpo_sde_reference.py <flow_grpo checkout>")
    main(sys.argv[1])
