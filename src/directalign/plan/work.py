"""What one optimizer step of each method runs, per process, from the config alone.

The methods' own ``nfe(batch)`` (``methods/*.py``) lives on a built method, which needs the model; the planner must
answer before any weight exists. Chosen: a small pure function per method here (:data:`WORK`) computing the same
counts from ``cfg``, plus the structure of its differentiable graphs, which ``nfe`` does not say;
``tests/plan/test_plan.py`` checks every function against the built method's ``nfe(batch)`` on the tiny world, so
the two cannot drift apart silently. A method without a function here (one added since) is counted by its own
``nfe``, called on a stand-in holding what ``nfe`` reads (:func:`method_nfe`), with an assumed graph structure.

A :class:`Work` says: transformer calls without and with gradient (before classifier-free guidance doubles them),
the guidance of each, how many images one differentiable graph holds (``graph_rows``) and how many transformer
calls one graph chains (``graph_calls``; DRaFT-K's K, AlignProp's truncated chain), whether each graph decodes and
scores its images (SRPO, ReFL, DRaFT, AlignProp: yes; GRPO: no, it scores the rollout without gradient), and the
no-gradient decodes and reward calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Work:
    nfe_no_grad: float  # transformer calls without gradient (rollout, reference model), per update and process
    nfe_grad: float  # transformer calls with gradient
    no_grad_guidance: float  # guidance of the calls without gradient
    grad_guidance: float  # guidance of the calls with gradient
    graph_rows: int  # images per differentiable graph (one backward)
    graph_calls: float = 1.0  # transformer calls chained in one graph
    method_checkpoint: bool = False  # each chained call recomputed in the backward (torch.utils.checkpoint)
    decode_in_graph: bool = True  # each graph decodes and scores its images with gradient
    decodes_no_grad: float = 0.0  # VAE decodes and reward calls without gradient (images)
    note: str = ""


def _srpo(cfg, b: int) -> Work:
    s = cfg.srpo
    branches = int(s.denoise_branch) + int(s.inversion_branch)
    offline = bool(s.offline_data) and s.offline_until_step < 0
    reuse = f", one rollout per {s.rollout_reuse} updates" if s.rollout_reuse > 1 else ""
    return Work(0 if offline else s.rollout_steps * b / s.rollout_reuse, branches * s.samples_per_rollout * b,
                s.rollout_guidance, s.train_guidance, b,
                note=f"{branches} branch(es) x {s.samples_per_rollout} draw(s), one backward each{reuse}")


def _refl(cfg, b: int) -> Work:
    r = cfg.refl
    lo, hi = r.step_range
    return Work((lo + hi) / 2 * b, b, r.guidance, r.guidance, b, note="expected rollout depth (lo + hi) / 2")


def _draft(cfg, b: int) -> Work:
    d = cfg.draft
    if cfg.method == "draft-lv":
        return Work(d.sampling_steps * b, d.lv_samples * b, d.guidance, d.guidance, b,
                    note=f"{d.lv_samples} re-noised copies, one backward each")
    return Work((d.sampling_steps - d.k) * b, d.k * b, d.guidance, d.guidance, b, graph_calls=d.k,
                method_checkpoint=d.checkpoint and d.k > 1, note=f"last {d.k} step(s) with gradient")


def _alignprop(cfg, b: int) -> Work:
    from ..methods.alignprop import truncation_probabilities

    a = cfg.alignprop
    p = truncation_probabilities(a.truncation, a.sampling_steps, gaussian=tuple(a.gaussian), uniform=tuple(a.uniform),
                                 fixed=a.fixed)
    eb = sum(j * pj for j, pj in enumerate(p))
    return Work(eb * b, (a.sampling_steps - eb) * b, a.guidance, a.guidance, b, graph_calls=a.sampling_steps - eb,
                method_checkpoint=a.checkpoint, note="expected truncation point")


def _grpo(cfg, b: int) -> Work:
    g = cfg.method_section  # grpo or grpo_fast
    samples = b * g.group_size / g.updates_per_rollout  # a rollout's samples are spread over its updates
    n_train = g.sde_window_size or max(1, int((g.sampling_steps - 1) * g.timestep_fraction))
    no_grad = g.sampling_steps + (n_train if g.kl_beta > 0 else 0)
    rows = int(min(g.micro_batch or max(1, samples), max(1, samples)))
    return Work(no_grad * samples, n_train * samples, g.guidance, g.guidance, max(1, rows), decode_in_graph=False,
                decodes_no_grad=samples, note=f"{samples:g} samples per update, {n_train} trained steps each")


class _StubAdapter:
    """What method constructors and ``nfe`` read from an adapter, without a pipeline: the (meta) transformer."""

    def __init__(self, transformer, has_guidance_embedding: bool):
        from types import SimpleNamespace

        self.transformer = transformer
        self.has_guidance_embedding = has_guidance_embedding
        self.pipe = SimpleNamespace(transformer=transformer)


def method_nfe(cfg, transformer, has_guidance_embedding: bool) -> dict[str, float]:
    """The method's own ``nfe(batch)``: called on a stand-in instance holding what ``nfe`` reads (``cfg``, the
    adapter, the method section), so no constructor runs (some read data sets); if that is not enough, on the
    method built over a stub adapter (the meta transformer)."""
    from types import SimpleNamespace

    from ..methods.registry import METHODS

    spec = METHODS[cfg.method]
    stub = _StubAdapter(transformer, has_guidance_embedding)
    try:
        stand_in = SimpleNamespace(cfg=cfg, adapter=stub, reward=None, g=cfg.method_section)
        return spec.build.nfe(stand_in, cfg.train.batch_size)
    except AttributeError:
        return spec.build(cfg, stub, None).nfe(cfg.train.batch_size)


def _generic(cfg, b: int, transformer=None, has_guidance_embedding: bool = False) -> Work:
    """A method without a work function here: its own ``nfe`` (which counts its CFG passes itself), one
    differentiable graph per ``micro_batch`` (or group) of samples, the transformer's loss alone (no decode in the
    graph, as in the likelihood / matching methods), each sample decoded and scored once without gradient."""
    from .sources import PlanError

    try:
        nfe = method_nfe(cfg, transformer, has_guidance_embedding)
    except Exception as e:  # noqa: BLE001 - any failure means: this method needs a work function
        raise PlanError(f"method {cfg.method!r}: the planner cannot count its model calls ({type(e).__name__}: {e}); "
                        "add a work function to directalign.plan.work.WORK") from None
    section = cfg.method_section
    samples = b * getattr(section, "group_size", 1)
    rows = getattr(section, "micro_batch", 0) or samples
    return Work(nfe["nfe_no_grad"], nfe["nfe_grad"], 1.0, 1.0, max(1, int(rows)), decode_in_graph=False,
                decodes_no_grad=samples, note="the method's own nfe(); graph structure assumed")


WORK: dict[str, Callable] = {
    "srpo": _srpo, "direct-align": _srpo, "refl": _refl, "draft-k": _draft, "draft-lv": _draft,
    "alignprop": _alignprop, "grpo": _grpo, "grpo-fast": _grpo,
}


def work_of(cfg, transformer=None, has_guidance_embedding: bool = False) -> Work:
    """The :class:`Work` of one update of ``cfg.method`` with ``cfg.train.batch_size`` prompts per process
    (``transformer``: the meta transformer, for methods counted through their own ``nfe``)."""
    fn = WORK.get(cfg.method)
    if fn is None:
        return _generic(cfg, cfg.train.batch_size, transformer, has_guidance_embedding)
    return fn(cfg, cfg.train.batch_size)
