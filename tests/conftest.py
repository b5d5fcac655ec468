"""Shared fixtures: tiny pipelines and LoRA files written by third-party writers (see ``writers.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

import writers  # noqa: E402

# STUDIO_TEST_THREADS=1 when the machine is shared with other torch work (oversubscribed OpenMP threads spin)
torch.set_num_threads(int(os.environ.get("STUDIO_TEST_THREADS", min(4, os.cpu_count() or 1))))

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("loras")


@pytest.fixture(scope="session")
def sdxl_loras(lora_dir) -> list[Path]:
    """Three diffusers/PEFT SDXL LoRAs on the UNet attention (different seeds, ranks, alphas)."""
    return [
        writers.peft_sdxl(lora_dir / "sdxl-a", 11, rank=4, alpha=8),
        writers.peft_sdxl(lora_dir / "sdxl-b", 12, rank=2, alpha=2),
        writers.peft_sdxl(lora_dir / "sdxl-c", 13, rank=8, alpha=4),
    ]


@pytest.fixture(scope="session")
def sdxl_te_loras(lora_dir) -> list[Path]:
    """Two diffusers/PEFT SDXL LoRAs with UNet and both text-encoder parts."""
    return [
        writers.peft_sdxl(lora_dir / "sdxl-te-a", 21, text_encoders=True),
        writers.peft_sdxl(lora_dir / "sdxl-te-b", 22, rank=2, alpha=4, text_encoders=True),
    ]


@pytest.fixture(scope="session")
def flux_loras(lora_dir) -> list[Path]:
    return [
        writers.peft_flux(lora_dir / "flux-a", 31, rank=4, alpha=4),
        writers.peft_flux(lora_dir / "flux-b", 32, rank=2, alpha=4, text_encoder=True),
    ]


@pytest.fixture(scope="session")
def flux_qr_loras(lora_dir) -> list[Path]:
    """Two QR-LoRA adapters (released layout, rank 4) for tiny FLUX; the second carries a PEFT text-encoder LoRA."""
    return [
        writers.qr_lora_released_layout(lora_dir / "qr-flux-a", 41),
        writers.qr_lora_released_layout(lora_dir / "qr-flux-b", 42, text_encoder=True),
    ]


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the 4-bit
    reference path runs many small ops per layer, and on the shared 2-core test machine intra-op threads make
    them 10-40x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def studio_for():
    """``studio_for(family)``: one tiny Studio per family, shared by the tests of a module."""
    from studio import Studio

    made = {}

    def get(family: str) -> "Studio":
        if family not in made:
            made[family] = Studio(f"tiny-{family}-random")
        return made[family]

    return get


def unet_inputs(batch: int = 2, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 32, 32, generator=gen),
        timestep=torch.tensor([500.0] * batch),
        encoder_hidden_states=torch.randn(batch, 77, 64, generator=gen),
        added_cond_kwargs={"text_embeds": torch.randn(batch, 32, generator=gen),
                           "time_ids": torch.randn(batch, 6, generator=gen)},
    )


def flux_inputs(batch: int = 2, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 256, 16, generator=gen),
        encoder_hidden_states=torch.randn(batch, 16, 32, generator=gen),
        pooled_projections=torch.randn(batch, 32, generator=gen),
        timestep=torch.tensor([0.5] * batch),
        guidance=torch.tensor([3.5] * batch),
        img_ids=torch.zeros(256, 3),
        txt_ids=torch.zeros(16, 3),
    )
