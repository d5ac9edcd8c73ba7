"""``spar-collect``: every ``eval_results.json`` under a folder as one markdown table of mIoU,
one row per distinct fingerprint (settings and weights; see :mod:`spar.results_table`).

``spar-collect outputs/eval`` (also ``python -m spar.collect`` and ``scripts/collect_results.py``).
"""

import argparse
from collections.abc import Sequence

from spar.config import report_user_errors
from spar.evaluation import collect_results


@report_user_errors
def main(argv: Sequence[str] | None = None) -> None:
    """The command line: one optional folder (default ``outputs/eval``). Results that cannot
    share a row (one setting on one dataset from two fingerprints) end it with ``error: ...``
    naming both files."""
    parser = argparse.ArgumentParser(
        description="Every eval_results.json under a folder as one table of mIoU."
    )
    parser.add_argument("folder", nargs="?", default="outputs/eval", help="searched recursively")
    print(collect_results(parser.parse_args(argv).folder))


if __name__ == "__main__":
    main()
