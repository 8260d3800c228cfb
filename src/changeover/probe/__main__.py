"""`python -m changeover.probe`: see changeover.probe.command."""

import sys

from changeover.probe.command import main

sys.exit(main())
