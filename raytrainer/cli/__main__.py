"""``python -m raytrainer.cli``: the same as the ``raytrainer`` console script."""
import sys

from raytrainer.cli.main import main

sys.exit(main())
