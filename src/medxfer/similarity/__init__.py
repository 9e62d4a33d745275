"""Feature-space similarity between natural images and medical images (the paper's Section 4)."""
