from agents.agent import main

raise SystemExit(main())
