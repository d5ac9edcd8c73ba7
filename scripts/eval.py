"""Score open-vocabulary segmentation on a benchmark: `python scripts/eval.py dataset=ade20k ...`.

An alias of ``spar-eval`` (:func:`spar.eval.main`): Hydra overrides, ``--help``,
``-m`` multirun and ``hydra.run.dir=`` work as before.
"""

from spar.eval import main

if __name__ == "__main__":
    main()
