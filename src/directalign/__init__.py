"""directalign: align text-to-image flow-matching models with reward models (Direct-Align + SRPO and baselines)."""

__version__ = "0.1.0"
