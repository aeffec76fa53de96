"""The multi-peer merge demo (`make demo`): see unity_crdt/demo.py and docs/quickstart.md."""

from unity_crdt.cli._demo import main

raise SystemExit(main())
