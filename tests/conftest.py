"""Shared test settings: small thread count so the suite behaves the same on 2-core CI."""

import torch

torch.set_num_threads(2)
