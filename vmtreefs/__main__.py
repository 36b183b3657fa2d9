"""``python -m vmtreefs`` is the ``vmtreefs`` command."""

import sys

from vmtreefs.app.cli import main

sys.exit(main())
