"""Evaluation: metrics, operating points, calibration, intervals and paired comparisons.

The one home of metric code. Everything here is a pure function of numpy arrays: no files,
no torch, so that training, studies, reports and comparisons all score predictions alike.
"""
