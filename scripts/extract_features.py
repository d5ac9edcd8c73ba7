"""Dense features of images to safetensors: `python scripts/extract_features.py images=dir/`.

An alias of ``spar-extract`` (:func:`spar.extract.main`): Hydra overrides, ``--help``,
``-m`` multirun and ``hydra.run.dir=`` work as before.
"""

from spar.extract import main

if __name__ == "__main__":
    main()
