"""Evaluation of videos (N, F, 3, H, W): every reward scores each frame and averages per video
(:mod:`directalign.rewards.video`), the frame-consistency indicator (:func:`directalign.metrics.frame_difference`)
joins the per-image indicators, and the image indicators, pixel diversity and grids see each video as its frame
strip (N, 3, H, F * W), frames left to right (what :func:`directalign.report_images.to_grid` draws)."""

from __future__ import annotations

import torch

from .. import metrics as M
from ..rewards.video import flatten_frames, frame_mean
from .scoring import score_images


def frame_strips(videos: torch.Tensor) -> torch.Tensor:
    """(N, F, 3, H, W) -> (N, 3, H, F * W), frames left to right."""
    return torch.cat(videos.unbind(1), dim=-1)


def video_columns(videos: torch.Tensor) -> dict[str, list]:
    """The per-video indicators images do not have: ``frame_difference``."""
    return {"frame_difference": M.frame_difference(videos).tolist()}


def score_videos(spec, videos: torch.Tensor, prompts: list[str]) -> dict:
    """:func:`directalign.eval.scoring.score_images` of every frame, averaged per video: absolute and relative
    scores (N,) and the frame-mean image embedding (N, D)."""
    frames, per_frame, f = flatten_frames(videos, prompts)
    s = score_images(spec, frames, per_frame)
    emb = s["embedding"]
    return {"score": frame_mean(s["score"], f), "relative": frame_mean(s["relative"], f),
            "embedding": emb.reshape(len(prompts), f, emb.shape[1]).mean(1)}
