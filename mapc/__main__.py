"""``python -m mapc``: the ``mapc`` command (used by ``--nproc`` and ``torchrun -m mapc``)."""
from .cli import main

main(prog_name="mapc")
