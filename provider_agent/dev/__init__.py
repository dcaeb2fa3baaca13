"""Development tools that ship with the agent: the reference coordinator, the backend
simulator, the demo."""
