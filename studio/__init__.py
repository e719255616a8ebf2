"""`studio`: the command line for people and scripts, on the public API only."""
