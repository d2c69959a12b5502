"""Sub-commands of the `dsv3` CLI, one module per capability."""
