"""Data: image decoding, dataset sources, splits, the decoded-image cache, augmentation."""
