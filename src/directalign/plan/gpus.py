"""Peak dense bf16 tensor throughput and memory of the GPUs the planner knows (vendor datasheets).

Dense means without 2:4 structured sparsity (the datasheets' headline numbers with sparsity are twice these).
Sources:

* H100 SXM5 80 GB: 989 TFLOPS bf16 (NVIDIA H100 Tensor Core GPU datasheet, "BF16 Tensor Core 1,979 teraFLOPS*",
  * with sparsity);
* H20 96 GB: 148 TFLOPS bf16 (NVIDIA H20 product brief; the GPU of the official SRPO run, 32x H20);
* A100 SXM 80 GB / 40 GB: 312 TFLOPS bf16 (NVIDIA A100 Tensor Core GPU datasheet, "BF16 Tensor Core 312 TFLOPS |
  624 TFLOPS*");
* L40S 48 GB: 362 TFLOPS bf16 (NVIDIA L40S datasheet, "BF16 Tensor Core 362.05 | 733 TFLOPS*");
* RTX 4090 24 GB: 165 TFLOPS bf16 with fp32 accumulation (NVIDIA Ada Lovelace architecture whitepaper,
  appendix table "Peak BF16 Tensor TFLOPS with FP32 Accumulate 165.2 | 330.4*").
"""

from __future__ import annotations

from dataclasses import dataclass

from .sources import PlanError


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # peak dense bf16 tensor throughput
    memory_gb: float  # the datasheet's memory, read as GiB (the planner's unit)
    source: str


GPUS: dict[str, GPU] = {g.name: g for g in (
    GPU("H100-SXM", 989.0, 80.0, "NVIDIA H100 datasheet (1979 TFLOPS bf16 with sparsity)"),
    GPU("H20", 148.0, 96.0, "NVIDIA H20 product brief"),
    GPU("A100-80GB", 312.0, 80.0, "NVIDIA A100 datasheet (624 TFLOPS bf16 with sparsity)"),
    GPU("A100-40GB", 312.0, 40.0, "NVIDIA A100 datasheet (624 TFLOPS bf16 with sparsity)"),
    GPU("L40S", 362.0, 48.0, "NVIDIA L40S datasheet (733 TFLOPS bf16 with sparsity)"),
    GPU("RTX-4090", 165.0, 24.0, "NVIDIA Ada Lovelace whitepaper (bf16, fp32 accumulate)"),
)}
ALIASES = {"h100": "H100-SXM", "h100sxm": "H100-SXM", "h100sxm5": "H100-SXM", "h20": "H20", "a100": "A100-80GB",
           "a10080gb": "A100-80GB", "a100sxm": "A100-80GB", "a10040gb": "A100-40GB", "l40s": "L40S",
           "rtx4090": "RTX-4090", "4090": "RTX-4090", "geforcertx4090": "RTX-4090"}
DEFAULT_GPU = "H100-SXM"


def gpu(name: str) -> GPU:
    """The GPU called ``name`` (case, spaces, dashes and underscores ignored), or a one-line :class:`PlanError`."""
    key = "".join(ch for ch in name.lower() if ch.isalnum())
    canonical = ALIASES.get(key) or next((g for g in GPUS if g.lower().replace("-", "") == key), None)
    if canonical is None:
        raise PlanError(f"--gpu {name!r}: unknown GPU; choose one of {', '.join(GPUS)}")
    return GPUS[canonical]
