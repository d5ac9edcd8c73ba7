"""Moved: the teacher-versus-student demo is :mod:`spar.tools.demo`; the bundled sample images are
``spar.data.SAMPLE_IMAGES``."""

raise ImportError(
    "spar.demo moved to spar.tools.demo (compare_teacher_student); "
    "SAMPLE_IMAGES is spar.data.SAMPLE_IMAGES"
)
