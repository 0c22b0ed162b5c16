"""Image rewards on videos: every frame is scored under its video's text and the scores are averaged per video.

A video is a (B, F, 3, H, W) tensor in [0, 1] (what :class:`directalign.adapters.wan.WanAdapter` decodes). With
``s(frame, text)`` the image reward, the video reward is

    R(video, text) = (1 / F) * sum_f s(video[f], text)

an image reward lifted to videos through their decoded frames, as reward-gradient video fine-tuning does with image
rewards (VADER, Prabhudesai et al. 2024, arXiv 2407.08737: aesthetic and HPS scores of generated frames, gradients
through the frames into the video model). Every SRPO form is a linear combination of scores
(:mod:`directalign.rewards.relative`), so the frame mean of a form is that form of the frame-mean scores:
:func:`directalign.rewards.relative.semantic_relative_reward` flattens the frames, scores them once through the image
tower and averages here, and SRPO and the baselines train on video unchanged.
"""

from __future__ import annotations

import torch


def is_video(images: torch.Tensor) -> bool:
    """True for a (B, F, 3, H, W) batch of videos, False for (B, 3, H, W) images."""
    return images.ndim == 5


def flatten_frames(videos: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, list[str], int]:
    """(B, F, 3, H, W) videos and B texts -> (B * F, 3, H, W) frames, B * F texts (video i's text for each of its
    frames, frames of a video contiguous) and F."""
    if videos.ndim != 5 or videos.shape[2] != 3:
        raise ValueError(f"expected videos of shape (B, F, 3, H, W), got {tuple(videos.shape)}")
    b, f = videos.shape[:2]
    if len(texts) != b:
        raise ValueError(f"{len(texts)} texts for {b} videos")
    return videos.reshape(b * f, *videos.shape[2:]), [t for t in texts for _ in range(f)], f


def frame_mean(scores: torch.Tensor, frames: int) -> torch.Tensor:
    """(B * F,) per-frame scores (frames of a video contiguous) -> (B,) per-video means."""
    return scores.reshape(-1, frames).mean(1)


def video_reward(score_fn, videos: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """``score_fn(frames, texts) -> (N,)`` applied to every frame, averaged per video: (B,), differentiable."""
    frames, per_frame, f = flatten_frames(videos, texts)
    return frame_mean(score_fn(frames, per_frame), f)
