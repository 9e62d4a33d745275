"""Classification (binary, multi-class, multi-label), the paper's main task: its job for the
trainer (``run``), the feature cache (``inputs``), choices on validation and test metrics
(``assess``), the model card and the trained model (``TrainedModel``)."""
