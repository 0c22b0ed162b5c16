"""Cheap rewards and slots shared by the steering tests."""

from __future__ import annotations

SEEDS = [3, 7]


class Brightness:
    """A cheap differentiable reward: the mean pixel value; counts the images it scores and keeps every call's
    scores."""

    def __init__(self):
        self.calls, self.history = 0, []

    def __call__(self, images, prompts):
        assert len(images) == len(prompts)
        self.calls += len(images)
        r = images.mean(dim=(1, 2, 3))
        self.history.append(r.detach().float().cpu())
        return r
