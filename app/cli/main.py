"""The `diffsr` command: parse, build a config, call the library, print.

The commands live in four modules by kind (`model_commands`, `serving_commands`, `measure_commands`,
`gallery_commands`),
registered on the one `app` through `common.command`, the error boundary.
"""

from __future__ import annotations

import logging
import sys

# isort: off
from diffsr.app.cli import model_commands, serving_commands, measure_commands, gallery_commands  # noqa: F401  (they register, in this order)
# isort: on
from diffsr.app.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(app())


if __name__ == "__main__":
    main()
