"""Shared fixtures: reference vectors of the original implementation and small models."""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels then run on CPU tensors in Triton's interpreter (set before triton is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the "triton" scan can run

REFERENCE_DIR = Path(__file__).parent / "reference"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference divided by the largest magnitude of ``expected``."""
    actual, expected = actual.detach().double().cpu(), expected.double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def norm_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (Frobenius norms)."""
    actual, expected = actual.detach().double().cpu(), expected.double().cpu()
    return ((actual - expected).norm() / expected.norm()).item()


def random_scan_case(batch, length, n, d, radius, dtype=torch.float64, seed=0, device="cpu"):
    """A scan problem: inputs ``u [batch, length, n, d]``, ``A [d, d]`` (orthogonal times
    ``radius``), an initial state ``[batch, n, ...]`` with rows in (-0.1, 0.1); drawn in
    float64, then cast to ``dtype`` and moved to ``device``."""
    from goom_ssm.scan import ScaledRows, normalize_rows

    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    A = (q * radius).to(dtype)
    u = torch.randn(batch, length, n, d, generator=g, dtype=torch.float64).to(dtype)
    initial = normalize_rows((torch.rand(batch, n, d, generator=g, dtype=torch.float64) * 0.2 - 0.1).to(dtype))
    return u.to(device), A.to(device), ScaledRows(*(t.to(device) for t in initial))


@pytest.fixture(scope="session")
def reference_vectors():
    return torch.load(REFERENCE_DIR / "original_tiny_vectors.pt", weights_only=True)


@pytest.fixture(scope="session")
def stress_case():
    return torch.load(REFERENCE_DIR / "stress_radius_1p5.pt", weights_only=True)


@pytest.fixture(scope="session")
def converted_tiny_dir(tmp_path_factory):
    """The original tiny checkpoint converted to a Hugging Face folder."""
    from goom_ssm.conversion.original import convert_original_checkpoint

    out = tmp_path_factory.mktemp("converted") / "tiny"
    convert_original_checkpoint(REFERENCE_DIR / "original_tiny.pt", out)
    return out


def tiny_config(**overrides):
    from goom_ssm import GoomSSMConfig

    sizes = dict(vocab_size=97, hidden_size=16, num_hidden_layers=2, num_state_heads=2, state_size=4)
    sizes.update(overrides)
    return GoomSSMConfig(**sizes)


@pytest.fixture
def tiny_model():
    from goom_ssm import GoomSSMForCausalLM

    torch.manual_seed(0)
    return GoomSSMForCausalLM(tiny_config()).eval()
