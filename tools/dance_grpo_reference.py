"""Golden data for ``tests/methods/test_dance_grpo_reference.py``: DanceGRPO's SDE step ``flux_step`` (transition
mean, std, x0 prediction and log-probability) and its sigma schedule, run by its own code on tiny seeded inputs.

``flux_step`` and ``sd3_time_shift`` are module-level functions of
``XueZeyue/DanceGRPO@15cc71d53cc2e6e18a68ee607d5fb6ba9a99e344`` ``fastvideo/train_grpo_flux.py``, whose imports
(fastvideo, FSDP utilities, wandb, cv2, ...) are not installable here; this tool parses the file with :mod:`ast`,
takes exactly those two function definitions and executes them unchanged with ``math`` and ``torch`` (all they use);
nothing of the reference is stored in this repository, only its inputs and outputs. The schedule is built as its
``sample_reference_model`` builds it (``torch.linspace(1, 0, N + 1)`` then ``sd3_time_shift(shift, .)``) with the
FLUX script's settings (``scripts/finetune/finetune_flux_grpo.sh``: ``--sampling_steps 16 --eta 0.3 --shift 3``).
Only torch and safetensors are needed::

    git clone https://github.com/XueZeyue/DanceGRPO /tmp/DanceGRPO
    git -C /tmp/DanceGRPO checkout 15cc71d53cc2e6e18a68ee607d5fb6ba9a99e344
    python tools/dance_grpo_reference.py /tmp/DanceGRPO   # writes tests/data/dance_grpo_reference/

What it writes: ``config.json`` (eta, shift, steps, the step indices, seeds, the source, the torch version) and
``reference.safetensors`` with ``sigma_schedule`` (N + 1,), and for each step index i of ``INDICES`` (two rows each,
concatenated: rows ``2k, 2k + 1`` use index ``INDICES[k]``; 0 is sigma = 1, N - 1 steps to sigma = 0):

* inputs ``latents``, ``model_output``, ``given_prev_sample`` (seeded N(0, 1)) and ``weights`` (B,);
* ``prev_sample_mean`` (``grpo=False, sde_solver=True``: the SDE mean), ``pred_original_sample``, ``given_log_prob``
  (``grpo=True`` with the given target), ``grad_model_output`` (the gradient of ``sum(weights * given_log_prob)``
  with respect to ``model_output``, as ``grpo_one_step`` backpropagates through it);
* ``sampled_prev_sample`` / ``sampled_log_prob``: the function's own draw (``prev_sample=None``, the global RNG
  seeded with ``DRAW_SEED`` before each index) and its log-prob.
"""

from __future__ import annotations

import ast
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

COMMIT = "15cc71d53cc2e6e18a68ee607d5fb6ba9a99e344"
FILE = "fastvideo/train_grpo_flux.py"
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "dance_grpo_reference"
ETA, SHIFT, STEPS, INDICES, SEED, DRAW_SEED = 0.3, 3.0, 16, (0, 5, 11, 15), 1505, 7


def extract(source: str) -> str:
    """The source of the module-level functions ``sd3_time_shift`` and ``flux_step``."""
    tree = ast.parse(source)
    found = {n.name: ast.get_source_segment(source, n) for n in tree.body
             if isinstance(n, ast.FunctionDef) and n.name in ("sd3_time_shift", "flux_step")}
    if len(found) != 2:
        raise SystemExit(f"{FILE} lacks sd3_time_shift or flux_step: another commit's layout")
    return found["sd3_time_shift"] + "\n\n" + found["flux_step"]


def main(dance_dir: str) -> None:
    env = {"torch": torch, "math": math}
    exec(extract((Path(dance_dir) / FILE).read_text(encoding="utf-8")), env)  # noqa: S102 - the reference's own code
    flux_step, sd3_time_shift = env["flux_step"], env["sd3_time_shift"]
    sigma_schedule = sd3_time_shift(SHIFT, torch.linspace(1, 0, STEPS + 1))
    g = torch.Generator().manual_seed(SEED)
    shape = (2 * len(INDICES), 4, 4, 4)
    latents, model_output, target = (torch.randn(shape, generator=g) for _ in range(3))
    weights = torch.randn(shape[0], generator=g)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "prev_sample_mean", "pred_original_sample", "given_log_prob", "grad_model_output", "sampled_prev_sample",
        "sampled_log_prob")}
    for k, index in enumerate(INDICES):
        rows = slice(2 * k, 2 * k + 2)
        x, v = latents[rows], model_output[rows].clone().requires_grad_(True)
        mean, x0 = flux_step(v, x, ETA, sigma_schedule, index, None, grpo=False, sde_solver=True)
        _, _, log_prob = flux_step(v, x, ETA, sigma_schedule, index, target[rows], grpo=True, sde_solver=True)
        (weights[rows] * log_prob).sum().backward()
        torch.manual_seed(DRAW_SEED)
        with torch.no_grad():
            drawn, _, drawn_lp = flux_step(v, x, ETA, sigma_schedule, index, None, grpo=True, sde_solver=True)
        for name, value in (("prev_sample_mean", mean), ("pred_original_sample", x0), ("given_log_prob", log_prob),
                            ("grad_model_output", v.grad), ("sampled_prev_sample", drawn),
                            ("sampled_log_prob", drawn_lp)):
            out[name].append(value.detach())
    tensors = {k: torch.cat(v) for k, v in out.items()}
    tensors.update(sigma_schedule=sigma_schedule, latents=latents, model_output=model_output,
                   given_prev_sample=target, weights=weights)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in tensors.items()}, str(OUT / "reference.safetensors"))
    config = {"source": f"XueZeyue/DanceGRPO@{COMMIT} {FILE} (flux_step, sd3_time_shift)", "eta": ETA,
              "shift": SHIFT, "steps": STEPS, "indices": list(INDICES), "seed": SEED, "draw_seed": DRAW_SEED,
              "versions": {"torch": torch.__version__}}
    (OUT / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    print(f"wrote {OUT}: log-probs {tensors['given_log_prob'].tolist()}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python tools/dance_grpo_reference.py <DanceGRPO checkout>")
    main(sys.argv[1])
