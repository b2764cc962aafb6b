"""``python -m directord``."""

import sys

from directord.cli.main import main

sys.exit(main())
