"""The `crit-pageread` command line: crit's commands plus page reading; one module per command."""
