"""`python -m arrag` runs the same CLI as the `arrag` console script."""

from arrag.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
