"""`python -m provider_agent` is the same as the `provider-agent` command."""

from provider_agent.cli import main

raise SystemExit(main())
