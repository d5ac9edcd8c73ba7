"""The interactive page: `python scripts/app.py [--port 7860] [--backbone tiny] [--checkpoint X]`.

An alias of ``spar-app`` (:func:`spar.app.main`). Needs the optional extra: ``pip install -e
".[app]"`` (Gradio). Then open http://127.0.0.1:7860.
"""

from spar.app import main

if __name__ == "__main__":
    main()
