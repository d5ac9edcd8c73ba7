"""Moved: the fault trials are :mod:`spar.tools.fault_trials` (the table of old spellings is
:data:`spar.deprecations.DEPRECATIONS`)."""

from .deprecations import moved_module_error

raise moved_module_error(__name__)
