"""Write a student's dense forward as ONNX: `python scripts/export.py backbone=tiny output=x.onnx`.

An alias of ``spar-export`` (:func:`spar.export_onnx.main`): Hydra overrides, ``--help`` and
``hydra.run.dir=`` work as for the other commands.
"""

from spar.export_onnx import main

if __name__ == "__main__":
    main()
