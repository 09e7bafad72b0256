"""Entry points: train, evaluate, sweep, frontier, serve, prove, demo, bench, submit."""
