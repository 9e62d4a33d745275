"""A run: its folder (``RunFolder``), its trained model (``TrainedModel``) and the pipeline that
makes them (``train``, ``evaluate``)."""
