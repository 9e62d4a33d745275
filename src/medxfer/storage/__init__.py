"""Storage, the bottom layer of a run: the run folder's files (``RunFolder``), the model file
(``model.pt``) of every task family, and checkpoints (damaged = a fresh start)."""
