"""Models: backbones by name (torchvision, timm), the classifier, training modes. Import from
the submodules (``spec`` needs no torch; ``factory`` builds models)."""
