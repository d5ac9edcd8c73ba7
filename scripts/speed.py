"""Measure student, teacher and training speed: `python scripts/speed.py backbone=siglip2`.

An alias of ``spar-speed`` (:func:`spar.speed.main`): Hydra overrides, ``--help``,
``-m`` multirun and ``hydra.run.dir=`` work as before.
"""

from spar.speed import main

if __name__ == "__main__":
    main()
