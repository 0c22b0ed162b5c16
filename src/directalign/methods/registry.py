"""Every training method ``method:`` can name, one line each (see :class:`directalign.methods.base.MethodSpec`)."""

from __future__ import annotations

from . import alignprop, awm, dpo, draft, grpo, nft, refl, srpo
from .base import MethodSpec

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    srpo.SRPO_SPEC,
    srpo.DIRECT_ALIGN_SPEC,
    refl.SPEC,
    draft.DRAFT_K_SPEC,
    draft.DRAFT_LV_SPEC,
    alignprop.SPEC,
    grpo.SPEC,
    grpo.FAST_SPEC,
    nft.SPEC,
    dpo.SPEC,
    awm.SPEC,
)}


def sections() -> dict[str, list[str]]:
    """``{section: [methods using it]}``: ``srpo`` serves srpo and direct-align, ``draft`` both DRaFT variants."""
    out: dict[str, list[str]] = {}
    for spec in METHODS.values():
        out.setdefault(spec.section, []).append(spec.name)
    return out
