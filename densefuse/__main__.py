"""``python -m densefuse ...``: the command line (also what ``torchrun -m densefuse train ...`` runs)."""
from .cli import main

if __name__ == "__main__":
    main(prog_name="densefuse")
