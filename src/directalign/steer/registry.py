"""Steering algorithms by ``--steer`` name: adding one is a module with a Steerer and one line here."""

from __future__ import annotations

from .best_of_n import BestOfN
from .noise_search import NoiseSearch

STEERERS = {
    "best-of-n": BestOfN(),
    "noise-search": NoiseSearch(),
}
