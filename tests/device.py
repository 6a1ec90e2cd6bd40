"""Where the model tests run: the CPU by default, CUDA with STREAMPLEX_TEST_DEVICE=cuda (bench/cuda.sh does)."""

from __future__ import annotations

import os

import torch

TEST_DEVICE = torch.device(os.environ.get("STREAMPLEX_TEST_DEVICE", "cpu"))
