"""Offline CPU demo: a landmark benchmark rendered from bundled real photographs, and a
pipeline comparing an ImageNet-pretrained network with its AP-loss and contrastive
fine-tunings (``apretrieval demo``)."""
