"""The edge of the package: export, the command line, the demo, data sets and checks."""
