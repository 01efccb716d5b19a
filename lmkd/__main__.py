import sys

from lmkd.cli import main

sys.exit(main())
