"""``python -m goom_ssm COMMAND ...`` (and ``accelerate launch -m goom_ssm train ...``): the ``goom-ssm`` command line."""

import sys

from .cli import main

sys.exit(main())
