"""`python -m flythinker.cli ...` = the `flythinker` command (also what launchers run: torchrun, accelerate)."""

import sys

from flythinker.cli import main

sys.exit(main())
