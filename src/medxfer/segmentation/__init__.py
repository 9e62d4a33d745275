"""Segmentation on an ImageNet backbone: the paper's Section 3.4, f = psi o theta*.

theta* is the classification backbone of :mod:`medxfer.models.factory` (same modes, BatchNorm
policies and offline weights); psi is a small U-Net decoder fed from the backbone's outputs
at strides 4, 8, 16 and 32. ``medxfer segment train|predict|export`` drives it.

Modules: ``data`` (image/mask pairs), ``model`` (taps + decoder), ``losses`` (CE + soft
Dice), ``metrics`` (Dice, IoU, pixel accuracy, HD95, bootstrap), ``engine`` (epoch, evaluation,
frozen-encoder cache), ``options`` and ``run`` (the run folder), ``inference`` (masks, ONNX).
"""
