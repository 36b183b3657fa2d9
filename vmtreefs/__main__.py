"""``python -m vmtreefs`` is the ``vmtreefs`` command."""

import sys

from vmtreefs.cli import main

sys.exit(main())
