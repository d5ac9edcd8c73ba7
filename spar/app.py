"""``spar-app``: the interactive page (Gradio, the ``app`` extra: ``pip install "spar[app]"``).

``spar-app [--port 7860] [--backbone tiny] [--checkpoint X]`` (also ``python -m spar.app`` and
``scripts/app.py``), then open http://127.0.0.1:7860. The page is :mod:`spar.tools.app`'s.
"""

from spar.deprecations import module_getattr
from spar.tools.app import main

#: ``from spar.app import build_page`` (the library before 0.2): an ImportError naming the page's
#: new home, :mod:`spar.tools.app` (:data:`spar.deprecations.DEPRECATIONS`).
__getattr__ = module_getattr(__name__)

__all__ = ["main"]

if __name__ == "__main__":
    main()
