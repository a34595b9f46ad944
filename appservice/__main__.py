"""``python -m appservice``."""

import sys

from appservice.cli import main

sys.exit(main())
