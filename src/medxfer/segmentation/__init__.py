"""Segmentation on a frozen (or fine-tuned) ImageNet backbone: the paper's Section 3.4,
f = psi o theta*, with psi a small U-Net decoder fed from the backbone's stride levels."""
