"""pals-profile: build pals.profile/v1 files from sweep CSVs (``pals-profile import CSV OUT_DIR``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pals_daemon.model.import_csv import add_import_arguments, run_import


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pals-profile`` console script."""
    parser = argparse.ArgumentParser(prog="pals-profile", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser(
        "import",
        help="build profiles from a CSV",
        description="Build profiles from an A100 power-cap sweep CSV (every point measured) or the ML.ENERGY "
        "v3 batch sweep CSV (H100 MoE; batch measured at 700 W, cap dimension modelled and labelled).",
    )
    add_import_arguments(imp)
    args = parser.parse_args(argv)
    return run_import(args, "pals-profile")


if __name__ == "__main__":
    raise SystemExit(main())
