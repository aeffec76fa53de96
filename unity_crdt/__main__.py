"""`python -m unity_crdt ...`: the same as the `unity-crdt` command."""

from .cli import main

raise SystemExit(main())
