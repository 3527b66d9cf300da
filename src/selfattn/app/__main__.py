"""``python -m selfattn.app``: the ``selfattn`` command."""
import sys

from .cli import main

sys.exit(main())
