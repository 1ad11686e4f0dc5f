"""The controller: a pure core (observations in, decision out, no I/O)."""
