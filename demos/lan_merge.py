"""The multi-peer merge demo (`make demo`): see unity_crdt/demo.py and docs/quickstart.md."""

from unity_crdt.demo import main

raise SystemExit(main())
