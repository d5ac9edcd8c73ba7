"""Gather every eval_results.json under a folder into one markdown table of mIoU.

`python scripts/collect_results.py outputs/eval`: an alias of ``spar-collect``
(:func:`spar.collect.main`).
"""

from spar.collect import main

if __name__ == "__main__":
    main()
