"""Steering algorithms by ``--steer`` name: adding one is a module with a Steerer and one line here."""

from __future__ import annotations

from .best_of_n import BestOfN
from .dno import DNO
from .fk import FKSteering
from .noise_search import NoiseSearch
from .reno import ReNO

STEERERS = {
    "best-of-n": BestOfN(),
    "noise-search": NoiseSearch(),
    "fk": FKSteering(),
    "reno": ReNO(),
    "dno": DNO(),
}
