import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """4 classes of generated shapes, 12 train and 4 val images each, 40 px JPEGs."""
    import common
    return common.make_demo_data(tmp_path_factory.mktemp("data") / "tiny", train_per_class=12,
                                 val_per_class=4, size=40, classes=4)
