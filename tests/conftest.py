"""Shared fixtures: no network anywhere, a quiet 2-thread torch, and a random-weight tiny world."""

from __future__ import annotations

import socket

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


class NetworkAccessError(RuntimeError):
    pass


def _is_loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) and address else address
    return isinstance(host, str) and (host in ("localhost", "::1") or host.startswith("127."))


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, request):
    """Any attempt to open a network connection fails the test. Loopback is refused too, except for tests marked
    ``allow_localhost`` (a local browser driver)."""
    local_ok = request.node.get_closest_marker("allow_localhost") is not None
    real = {"connect": socket.socket.connect, "connect_ex": socket.socket.connect_ex,
            "create_connection": socket.create_connection}

    def guard(name):
        def call(self, address, *args, **kwargs):
            if local_ok and _is_loopback(address):
                return real[name](self, address, *args, **kwargs)
            raise NetworkAccessError(f"test tried to connect to {address}")

        return call

    def create_connection(address, *args, **kwargs):
        if local_ok and _is_loopback(address):
            return real["create_connection"](address, *args, **kwargs)
        raise NetworkAccessError(f"test tried to connect to {address}")

    monkeypatch.setattr(socket.socket, "connect", guard("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", guard("connect_ex"))
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import (often before this fixture runs): set its flag too, so hub
    # lookups fail the way they do offline instead of reaching the socket guard
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


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
