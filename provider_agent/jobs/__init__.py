"""One job from admission to its terminal frame: routing, the relay, usage, route health."""
