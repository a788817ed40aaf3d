"""Shared test settings: one torch thread, so the suite behaves the same on any CI machine."""

import torch

torch.set_num_threads(1)  # tiny tensors: threads cost more than they give
