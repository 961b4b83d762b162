"""``python -m ocibuild.cli``: the command line, as the ``ocibuild`` console script runs it."""

import sys

from . import main

sys.exit(main())
