"""`python -m orchestrator` is `orchestrate`."""

from orchestrator.cli.main import main

raise SystemExit(main())
