"""Training: device choice, metrics, the frozen-backbone feature cache and the epoch loop."""
