"""The `seekstack` command line: one subcommand per component, plus `demo` and `bench`."""
