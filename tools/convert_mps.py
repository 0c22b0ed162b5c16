"""Convert the published MPS checkpoint (Kwai-Kolors/MPS, ``MPS_overall_checkpoint.pth``) to a safetensors state dict
that ``reward.kind=mps`` loads (:mod:`directalign.rewards.mps`).

The published file is a whole pickled model (``torch.save(model)`` of the repository's ``trainer.models.clip_model
.CLIPModel``), not a state dict: reading it means unpickling, which runs code and needs the MPS repository's classes
and the transformers version they were pickled with. ``directalign`` never does that (it reads weights with
``torch.load(weights_only=True)`` or safetensors). This script does it once, in a separate virtual environment of its
own, for a file you trust, and writes only tensors::

    git clone https://github.com/Kwai-Kolors/MPS /tmp/MPS
    python3 -m venv /tmp/venv-mps
    /tmp/venv-mps/bin/pip install torch transformers==4.27.3 einops safetensors
    /tmp/venv-mps/bin/python tools/convert_mps.py MPS_overall_checkpoint.pth MPS_overall.safetensors \\
        --mps-repo /tmp/MPS

(transformers 4.27.3 is the version the MPS repository pins; its pickled CLIP classes unpickle against it.) Then set
``reward.kind: mps`` and ``reward.path: MPS_overall.safetensors``. The output keys are the model's own state dict:
``model.<transformers CLIPModel key>`` and ``cross_model.layers.<i>.<0|1>.fn.<...>``, tensors made contiguous,
dtype kept. The project itself is not imported here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def convert(checkpoint: Path, out: Path, mps_repo: Path) -> int:
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(mps_repo))  # trainer.models.* : the classes the pickle names
    model = torch.load(checkpoint, map_location="cpu", weights_only=False)  # trusted file, separate venv
    state = model.state_dict() if hasattr(model, "state_dict") else model
    tensors = {k: v.detach().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    if not any(k.startswith("cross_model.") for k in tensors):
        raise SystemExit(f"{checkpoint} holds no cross_model.* weights: not an MPS checkpoint")
    save_file(tensors, str(out), metadata={"source": checkpoint.name, "format": "pt"})
    return len(tensors)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path, help="MPS_overall_checkpoint.pth")
    ap.add_argument("out", type=Path, help="the .safetensors to write")
    ap.add_argument("--mps-repo", type=Path, required=True, help="a checkout of github.com/Kwai-Kolors/MPS")
    args = ap.parse_args(argv)
    n = convert(args.checkpoint, args.out, args.mps_repo)
    print(f"wrote {args.out} ({n} tensors)")


if __name__ == "__main__":
    main()
