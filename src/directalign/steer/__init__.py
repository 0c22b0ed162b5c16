"""Inference-time alignment ("steering"): spend sampling compute instead of training to raise a reward.

Each algorithm is one module with a :class:`~directalign.steer.base.Steerer`, registered in
:data:`directalign.steer.registry.STEERERS` (one line). ``directalign sample --steer NAME`` runs them.
"""

from .base import Steerer, SteerError, SteerResult, SteerSettings

__all__ = ["SteerError", "SteerResult", "SteerSettings", "Steerer"]
