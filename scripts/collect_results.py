"""Gather every eval_results.json under a folder into one markdown table of mIoU.

`python scripts/collect_results.py outputs/eval`
"""

import sys

from spar.evaluation import collect_results

if __name__ == "__main__":
    print(collect_results(sys.argv[1] if len(sys.argv) > 1 else "outputs/eval"))
