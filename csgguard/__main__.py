"""``python -m csgguard`` (and ``torchrun -m csgguard``) run the CLI."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="csgguard")
