"""Fault trials (kill -9, corruption, bad images): `python scripts/fault_trials.py`.

An alias of ``python -m spar.tools.fault_trials`` (:func:`spar.tools.fault_trials.main`):
Hydra overrides, ``--help``, ``-m`` multirun and ``hydra.run.dir=`` work as before.
"""

from spar.tools.fault_trials import main

if __name__ == "__main__":
    main()
