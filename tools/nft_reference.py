"""Golden data for ``tests/methods/test_nft.py``: DiffusionNFT's loss computed by the reference code itself.

The loss of ``NVlabs/DiffusionNFT@24af5554898d85e93efa492f42b5e9cdf4156e9b`` lives inside the training loop of
``scripts/train_nft_sd3.py`` (from ``loss_terms = {}`` to the ``kl_div_loss`` logging, lines 908-978), which needs
CUDA, absl, wandb and SD3 to run as a script. This tool reads that file from a checkout, cuts out exactly that block
(found by its first and last statements, so a different commit fails loudly instead of running something else) and
executes it unchanged on fixed tiny CPU tensors standing in for the three transformer outputs; nothing of the
reference is stored in this repository, only its inputs and outputs. Only torch and safetensors are needed::

    git clone https://github.com/NVlabs/DiffusionNFT /tmp/DiffusionNFT
    git -C /tmp/DiffusionNFT checkout 24af5554898d85e93efa492f42b5e9cdf4156e9b
    python tools/nft_reference.py /tmp/DiffusionNFT/scripts/train_nft_sd3.py   # writes tests/data/nft_reference/

What it writes: ``reference.safetensors`` with the inputs (``x0``, ``noise``, ``t``, ``advantages``,
``forward_prediction``, ``old_prediction``, ``ref_forward_prediction``; ``xt = (1 - t) x0 + t noise`` as the code
builds it) and the code's outputs (``loss``, ``unweighted_policy_loss``, ``kl_div_loss``, ``old_deviate`` and
``grad``: the gradient of ``loss`` with respect to ``forward_prediction``), and ``config.json`` with the settings (beta, KL beta,
adv_clip_max), the commit and the torch version.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

COMMIT = "24af5554898d85e93efa492f42b5e9cdf4156e9b"
FIRST = "loss_terms = {}"
LAST = 'loss_terms["old_kl_div"] = torch.mean('
OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "nft_reference"
SETTINGS = {"beta": 0.7, "kl_beta": 0.05, "adv_clip_max": 5.0}


def loss_block(source: str) -> str:
    """The reference's loss statements, dedented (from FIRST to the end of the statement that starts with LAST)."""
    lines = source.splitlines()
    start = next(i for i, s in enumerate(lines) if s.strip() == FIRST)
    last = next(i for i, s in enumerate(lines) if i > start and s.strip().startswith(LAST))
    end = last + 1
    while not lines[end - 1].rstrip().endswith(")") or lines[end].strip().startswith((")", ".")):
        end += 1
    block = textwrap.dedent("\n".join(lines[start:end]))
    compile(block, "train_nft_sd3.py", "exec")  # a syntax error here means another commit's layout
    return block


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2509)
    shape = (3, 4, 2, 2)
    x = {k: torch.randn(shape, generator=g) for k in ("x0", "noise", "forward_prediction", "old_prediction",
                                                       "ref_forward_prediction")}
    x["t"] = torch.tensor([0.9, 0.5, 0.1])
    x["advantages"] = torch.tensor([[-6.5], [0.7], [3.0]])  # one clipped at -5
    return x


def main(path: str) -> None:
    block = loss_block(Path(path).read_text(encoding="utf-8"))
    x = inputs()
    t_expanded = x["t"].view(-1, 1, 1, 1)
    forward_prediction = x["forward_prediction"].clone().requires_grad_(True)
    config = SimpleNamespace(beta=SETTINGS["beta"], train=SimpleNamespace(
        adv_clip_max=SETTINGS["adv_clip_max"], beta=SETTINGS["kl_beta"], adv_mode="all", use_lora=True))
    env = {"torch": torch, "config": config, "j_idx": 0, "x0": x["x0"], "t_expanded": t_expanded,
           "xt": (1 - t_expanded) * x["x0"] + t_expanded * x["noise"], "forward_prediction": forward_prediction,
           "old_prediction": x["old_prediction"], "ref_forward_prediction": x["ref_forward_prediction"],
           "train_sample_batch": {"advantages": x["advantages"]}}
    exec(block, env)  # noqa: S102 - the reference's own statements, read from the checkout given on the command line
    loss = env["loss"]
    loss.backward()
    # the code's ``loss += ...`` adds the KL in place to ``policy_loss`` (the same tensor), so the policy part is
    # stored as its unweighted mean ``ori_policy_loss.mean()`` (times adv_clip_max it is the policy loss)
    terms = env["loss_terms"]
    out = dict(x, loss=loss.detach().clone().reshape(1).double(),
               unweighted_policy_loss=terms["unweighted_policy_loss"].clone().reshape(1).double(),
               kl_div_loss=terms["kl_div_loss"].clone().reshape(1).double(),
               old_deviate=terms["old_deviate"].clone().reshape(1).double(),
               grad=forward_prediction.grad.detach().clone())
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(OUT / "reference.safetensors"))
    (OUT / "config.json").write_text(json.dumps(dict(SETTINGS, commit=COMMIT, file="scripts/train_nft_sd3.py",
                                                     torch=torch.__version__), indent=1) + "\n")
    print(f"wrote {OUT}: loss {float(loss.detach()):.6f}")


if __name__ == "__main__":
    main(sys.argv[1])
