"""Teacher vs student on images: `python scripts/demo.py [images=dir] [checkpoint=path]`.

An alias of ``python -m spar.tools.demo`` (:func:`spar.tools.demo.main`): Hydra overrides,
``--help``, ``-m`` multirun and ``hydra.run.dir=`` work as before.
"""

from spar.tools.demo import main

if __name__ == "__main__":
    main()
