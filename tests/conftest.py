"""Test-wide setup. TRITON_INTERPRET must be set before any kernel module is imported, so that
Triton decorates the kernels for its CPU interpreter (docs/KERNELS.md); a GPU run can set it to 0."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from kernel_helpers import device, pin_fp32_matmul, poisoned  # noqa: E402, F401 (fixtures of the kernel tests)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"authors' fixtures not found at {FIXTURES} (they live in ../shared/fixtures beside the repo)")
    return FIXTURES
