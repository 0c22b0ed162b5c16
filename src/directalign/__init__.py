"""directalign: align text-to-image flow-matching models with reward models (Direct-Align + SRPO and baselines).

The public API is small: :func:`load_config`, :func:`train`, :func:`load_run` and :func:`steered_sample` (see
:mod:`directalign.api`), and the tiny world's loaders in :mod:`directalign.world.load`.
"""

__version__ = "0.1.0"

from .api import load_config, load_run, steered_sample, train  # light: heavy imports happen inside the functions

__all__ = ["__version__", "load_config", "load_run", "steered_sample", "train"]
