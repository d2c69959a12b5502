"""`python -m dsv3` is the same as the `dsv3` command."""

from dsv3.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
