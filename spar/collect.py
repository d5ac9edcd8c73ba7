"""``spar-collect``: every ``eval_results.json`` under a folder as one markdown table of mIoU.

``spar-collect outputs/eval`` (also ``python -m spar.collect`` and ``scripts/collect_results.py``).
"""

import argparse
from collections.abc import Sequence

from spar.evaluation import collect_results


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: one optional folder (default ``outputs/eval``)."""
    parser = argparse.ArgumentParser(
        description="Every eval_results.json under a folder as one table of mIoU."
    )
    parser.add_argument("folder", nargs="?", default="outputs/eval", help="searched recursively")
    print(collect_results(parser.parse_args(argv).folder))


if __name__ == "__main__":
    main()
