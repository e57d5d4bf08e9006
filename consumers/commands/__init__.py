"""The `profiles` subcommands, grouped by what they work on; consumers/cli.py wires them into one group.

base.py: the command classes (help wrapping, error handling) and what every command shares (stop
signals, the broker check); options.py: option groups shared between commands, and the one mapping
from options to Settings; live.py, logs.py, modelling.py: the commands themselves.
"""
