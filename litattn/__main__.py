"""`python -m litattn`: the command line (litattn/cli.py)."""

from litattn.cli import main

if __name__ == "__main__":
    main()
