"""Segment one image with class names: `python scripts/segment.py image=x.jpg classes="[sky,road]"`.

An alias of ``spar-segment`` (:func:`spar.segment.main`): Hydra overrides, ``--help``,
``-m`` multirun and ``hydra.run.dir=`` work as before.
"""

from spar.segment import main

if __name__ == "__main__":
    main()
