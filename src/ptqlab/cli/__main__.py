"""``python -m ptqlab.cli``: the ``ptqlab`` command."""

from . import main

raise SystemExit(main())
