"""``python -m timm_fslt`` runs the ``fslt`` command line."""
from timm_fslt.apps.cli import main

raise SystemExit(main())
