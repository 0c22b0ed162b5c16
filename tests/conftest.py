"""Shared fixtures: no network anywhere, a quiet 2-thread torch, and a random-weight tiny world."""

from __future__ import annotations

import socket

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


class NetworkAccessError(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a network connection fails the test (loopback included: nothing here needs it)."""

    def refuse(self, address, *args, **kwargs):
        raise NetworkAccessError(f"test tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(None, a[0] if a else None))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def random_world_dir(tmp_path_factory):
    """A tiny world with the shipped architecture and random weights (fast, independent of the shipped ones)."""
    from diffusers import FluxPipeline

    from directalign.compat import quiet_loading
    from directalign.world import architecture as arch

    quiet_loading()
    root = tmp_path_factory.mktemp("random-world")
    torch.manual_seed(0)
    comps = arch.new_generator_components()
    FluxPipeline(**comps).save_pretrained(root / "generator")
    model, tok = arch.new_reward()
    model.save_pretrained(root / "reward")
    tok.save_pretrained(root / "reward")
    return root


@pytest.fixture
def random_world(random_world_dir, monkeypatch):
    """Point the 'tiny-world' model and reward at the random-weight world for one test."""
    monkeypatch.setenv("DIRECTALIGN_WORLD_DIR", str(random_world_dir))
    return random_world_dir
