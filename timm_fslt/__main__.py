"""``python -m timm_fslt`` runs the ``fslt`` command line."""
from .cli import main

raise SystemExit(main())
