"""``python -m streamrelay.publisher``: the same as ``streamrelay-publish``."""

from .cli import main

raise SystemExit(main())
