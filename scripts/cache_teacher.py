"""Fill the teacher cache for a training config: `python scripts/cache_teacher.py backbone=...`.

An alias of ``spar-cache`` (:func:`spar.cache.main`): Hydra overrides, ``--help``,
``-m`` multirun and ``hydra.run.dir=`` work as before.
"""

from spar.cache import main

if __name__ == "__main__":
    main()
