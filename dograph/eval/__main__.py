"""``python -m dograph.eval RUN_DIR [overrides]``: evaluate a finished run (see ``dograph.eval.cli``)."""

import sys

from dograph.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
