"""Moved: the fault trials are :mod:`spar.tools.fault_trials`."""

raise ImportError("spar.fault_trials moved to spar.tools.fault_trials")
