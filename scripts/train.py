"""Distil the sliding-window teacher into the single pass: `python scripts/train.py backbone=...`.

An alias of ``spar-train`` (:func:`spar.train.main`): Hydra overrides, ``--help``,
``-m`` multirun and ``hydra.run.dir=`` work as before.
"""

from spar.train import main

if __name__ == "__main__":
    main()
