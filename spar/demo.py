"""Moved: the teacher-versus-student demo is :mod:`spar.tools.demo`; the bundled sample images are
``spar.data.SAMPLE_IMAGES`` (:data:`spar.deprecations.DEPRECATIONS`)."""

from .deprecations import moved_module_error

raise moved_module_error(__name__)
