"""Command-line entry points: pals-daemon, palsctl, pals-simnode."""
