"""Shared fixtures: the real models in ../shared/models and seeded random models per family."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))   # lets tests import the `support` helpers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = Path(os.environ.get("AMXC_SHARED_MODELS", REPO.parent / "shared" / "models"))
SHARED_EVAL = SHARED_MODELS.parent / "eval"


def shared_model(name: str) -> Path:
    path = SHARED_MODELS / name
    if not path.exists():
        pytest.skip(f"real model {name} not found in {SHARED_MODELS} (set AMXC_SHARED_MODELS)")
    return path


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return shared_model("stories260K")


@pytest.fixture(scope="session")
def yuan_dir() -> Path:
    return shared_model("yuan2-tiny-random")


@pytest.fixture(scope="session")
def shared_eval() -> Path:
    if not SHARED_EVAL.exists():
        pytest.skip(f"evaluation texts not found in {SHARED_EVAL}")
    return SHARED_EVAL


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return shared_model("smollm2-135m-instruct-q4_1") / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def random_models(tmp_path_factory) -> dict[str, Path]:
    """Seeded random-weight checkpoints of every supported family, saved as HF directories."""
    from support.random_models import FAMILY_CONFIGS, save_random_model

    root = tmp_path_factory.mktemp("random_models")
    return {name: save_random_model(name, root / name) for name in FAMILY_CONFIGS}


@pytest.fixture(scope="session")
def stories_art(tmp_path_factory, stories_dir) -> Path:
    """stories260K compiled with the default pipeline (once per test session)."""
    from amxc.api import compile
    return compile(stories_dir, tmp_path_factory.mktemp("art") / "stories.amxc", progress=False)


@pytest.fixture(scope="session")
def smollm2_art(tmp_path_factory, smollm2_gguf) -> Path:
    from amxc.api import compile
    return compile(smollm2_gguf.parent, tmp_path_factory.mktemp("art") / "smollm2.amxc", progress=False)


@pytest.fixture(scope="session")
def smollm2_nf4_art(tmp_path_factory, smollm2_gguf) -> Path:
    """SmolLM2 with NF4 round-to-nearest weights (tests about kernels and scheduling: the codes'
    choice does not matter to them, and calibration takes minutes)."""
    from amxc.api import compile
    return compile(smollm2_gguf.parent, tmp_path_factory.mktemp("art") / "smollm2-nf4.amxc",
                   quant="nf4{method=rtn}", progress=False)


@pytest.fixture
def tier(request) -> str:
    """A native ISA tier, for `parametrize("tier", support.native.ALL_TIERS, indirect=True)`:
    every tier is an item on every host; one this host cannot run is skipped with the missing
    CPU flags named, or fails where $AMXC_EXPECT_TIERS (CI: comma-separated tiers) names it."""
    from support.native import require_tier
    return require_tier(request.param)
