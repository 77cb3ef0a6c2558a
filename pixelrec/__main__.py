"""`python -m pixelrec` runs the `pixelrec` command (so `torchrun ... -m pixelrec COMMAND` works)."""

from .cli import main

if __name__ == "__main__":
    main()
