"""The command line: click groups, the terminal reporter, `runs compare`. Only here do errors become one line and an exit code."""
