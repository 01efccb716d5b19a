"""``python -m lmkd.cli``: the same as ``lmkd`` and ``python -m lmkd``."""

import sys

from lmkd.cli import main

sys.exit(main())
